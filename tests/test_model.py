"""Model loss properties: finite class weights, ignored undefined labels, per-cell means."""

from pathlib import Path

import pytest
import torch

from bigatlas.bf16_linear import bf16_linear, native_bf16
from bigatlas.config import ModelConfig
from bigatlas.distributions import Counts, nll
from bigatlas.model import VAEModule, class_weights


def batch(seed=0, cells=40, genes=30):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(cells, genes, generator=g) * 3)
    codes = torch.randint(0, 3, (cells, 1), generator=g)
    labels = torch.randint(0, 4, (cells, 1), generator=g)
    return Counts.from_dense(x), codes, labels


def model(**kw):
    torch.manual_seed(0)
    return VAEModule(30, [3], [4], ModelConfig(**kw), class_counts=[[10, 0, 5, 1]]).eval()


def loss(m, counts, codes, labels, **kw):
    torch.manual_seed(1)
    return m(counts, codes, labels, **kw)


def test_class_weights_finite_with_an_empty_class():
    w = class_weights(torch.tensor([10, 0, 5, 1]))
    assert torch.isfinite(w).all() and w[1] == 0
    assert torch.allclose(w[[0, 2, 3]], torch.tensor([16 / 30, 16 / 15, 16 / 3]))


def test_class_weightings_keep_the_mean_weight_per_cell():
    counts = torch.tensor([400.0, 100.0, 0.0, 4.0])
    for weighting, power in (("inverse", 1.0), ("sqrt-inverse", 0.5), ("none", 0.0)):
        w = class_weights(counts, weighting).double()
        assert w[2] == 0 and torch.isclose((w * counts).sum() / counts.sum(), torch.tensor(1.0, dtype=w.dtype))
        ratio = w[3] / w[0]  # a class 100x rarer weighs 100**power times more
        assert torch.isclose(ratio, torch.tensor(100.0**power, dtype=w.dtype), rtol=1e-5), weighting


def test_latent_size_defaults_to_10_with_labels_and_16_without():
    def sizes(m):
        return m.n_latent, m.z_mean.out_features, m.decoder[0].in_features, [h.in_features for h in m.heads]

    assert sizes(VAEModule(30, [3], [4], ModelConfig())) == (10, 10, 10 + 8, [10])
    assert sizes(VAEModule(30, [3], [], ModelConfig())) == (16, 16, 16 + 8, [])
    assert sizes(VAEModule(30, [3], [], ModelConfig(n_latent=12))) == (12, 12, 12 + 8, [])  # a set value holds
    assert sizes(VAEModule(30, [3, 5], [4], ModelConfig(n_latent=6))) == (6, 6, 6 + 16, [6])


def test_encoder_dropout_defaults_to_on_with_labels_and_off_without():
    def rates(m):
        return [layer.p for layer in m.encoder if isinstance(layer, torch.nn.Dropout)]

    assert rates(VAEModule(30, [3], [4], ModelConfig())) == [0.1]
    assert rates(VAEModule(30, [3], [], ModelConfig())) == []
    assert rates(VAEModule(30, [3], [], ModelConfig(dropout=0.2))) == [0.2]  # a set value holds either way
    assert rates(VAEModule(30, [3], [4], ModelConfig(dropout=0.0))) == []
    torch.manual_seed(0)
    m = VAEModule(30, [3], [], ModelConfig()).train()
    counts, codes, _ = batch()
    x = torch.log1p(counts.dense)
    assert torch.equal(m.encoder(x), m.encoder(x))  # no dropout noise in training mode without labels


def test_batch_in_heads_shifts_the_mean_by_batch_beside_the_hidden_layer():
    """With batch_in_heads the mean head reads the batch embeddings beside the hidden layer: with the
    decoder's hidden layer blind to them (their input weights zeroed), two batches still get different means;
    without it, the same ones. The dispersion and gate heads read the hidden layer alone either way."""
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    codes = [torch.zeros(5, 2, dtype=torch.long), torch.tensor([[1, 2]] * 5)]
    for on in (True, False):
        torch.manual_seed(0)
        cfg = ModelConfig(batch_in_heads=on, dispersion="gene-cell")
        m = VAEModule(30, [3, 4], [], cfg).eval()
        assert m.px_scale.in_features == 128 + (16 if on else 0)
        assert m.px_r.in_features == m.gate.in_features == 128
        with torch.no_grad():
            m.embeddings[0].weight.normal_()
            m.embeddings[1].weight.normal_()
            m.decoder[0].weight[:, 16:] = 0.0  # the hidden layer sees z only
            out = [m.decoder_outputs(z, c) for c in codes]
        assert torch.equal(out[0][1], out[1][1]) and torch.equal(out[0][2], out[1][2])
        assert torch.equal(out[0][0], out[1][0]) != on


def test_layer_norm_treats_each_cell_on_its_own():
    """norm="layer": no BatchNorm anywhere, and in training mode a cell's hidden layer does not depend on which
    other cells share its minibatch; with BatchNorm it does. Unset: layer with label heads, batch without."""
    counts, _, _ = batch()
    x = torch.log1p(counts.dense)
    for norm, labels in (("layer", []), ("batch", []), (None, [4]), (None, [])):
        torch.manual_seed(0)
        m = VAEModule(x.shape[1], [3], labels, ModelConfig(norm=norm, dropout=0.0)).train()
        layer = norm == "layer" or (norm is None and bool(labels))
        assert any(isinstance(mod, torch.nn.BatchNorm1d) for mod in m.modules()) != layer
        alone = torch.allclose(m.encoder(x)[:5], m.encoder(x[:8])[:5], atol=1e-6)
        assert alone == layer


def test_no_labelled_cells_gives_zero_label_loss():
    counts, codes, labels = batch()
    out = loss(model(), counts, codes, torch.full_like(labels, -1))
    assert out.terms["label"].item() == 0.0 and torch.isfinite(out.total)


def test_undefined_cells_never_contribute():
    counts, codes, labels = batch()
    labels[:10] = -1
    other = labels.clone()
    a = loss(model(), counts, codes, labels).terms["label"]
    other[:10] = -1  # unchanged
    b = loss(model(), counts, codes, other).terms["label"]
    assert torch.equal(a, b)
    for _value in range(4):  # whatever an undefined cell's class would be, nothing changes
        c = labels.clone()
        c[:10] = -1
        assert torch.equal(loss(model(), counts, codes, c).terms["label"], a)


def test_loss_is_a_per_cell_mean():
    """Splitting a batch into 7 + 33 cells and recombining by cell counts gives the whole batch's terms:
    each cell weighs the same whatever the batch size (the original divided by the nominal size)."""
    counts, codes, labels = batch()
    m = model(likelihood="nb")
    whole = loss(m, counts, codes, labels)
    first = torch.arange(40) < 7
    a = loss(m, counts, codes, labels, cell_mask=first)
    b = loss(m, counts, codes, labels, cell_mask=~first)
    assert (a.n_cells, b.n_cells) == (7, 33)
    for k in ("recon", "kl"):
        torch.testing.assert_close((7 * a.terms[k] + 33 * b.terms[k]) / 40, whole.terms[k])


def test_eval_mask_scores_without_gradient_and_matches_a_masked_forward():
    counts, codes, labels = batch()
    m = model()
    mask = torch.arange(40) < 30
    both = loss(m, counts, codes, labels, cell_mask=mask, eval_mask=~mask)
    only_val = loss(m, counts, codes, labels, cell_mask=~mask)
    for k in ("recon", "kl", "label"):
        torch.testing.assert_close(both.terms[f"val_{k}"], only_val.terms[k])


def test_csr_first_layer_equals_the_dense_encoder_on_both_paths(monkeypatch):
    """A CSR batch reaches the first layer as a sparse matmul or densified (whichever is faster on
    the device); either way q(z|x) equals the encoder applied to the dense matrix."""
    import bigatlas.model as model_module

    x = batch(seed=5)[0].dense
    x[3] = 0  # an empty cell
    for normalize_total in (None, 1e4):
        m = model(normalize_total=normalize_total)
        with torch.no_grad():
            ref = m.encode(x)
            for dense in (True, False):
                monkeypatch.setattr(model_module, "_dense_is_faster", lambda _x, d=dense: d)
                for inp in (Counts.from_sparse_csr(x.to_sparse_csr()), x.to_sparse_csr()):  # Counts or bare CSR
                    for a, b in zip(m.encode(inp), ref):
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_gpu_batch_reaches_the_first_layer_dense_up_to_its_size_limit():
    """On a GPU the sparse matmul's weight gradient makes the host wait every step: a batch of up to
    GPU_DENSE_MAX cells × genes is read dense, a larger one keeps the sparse matmul (the device and shape
    are all the rule reads; a stand-in batch carries them)."""
    from types import SimpleNamespace

    import bigatlas.model as model_module

    def on_gpu(cells, genes):
        return SimpleNamespace(device=torch.device("cuda", 0), shape=(cells, genes))

    limit = model_module.GPU_DENSE_MAX
    assert model_module._dense_is_faster(on_gpu(limit // 2000, 2000))
    assert model_module._dense_is_faster(on_gpu(128, 60_000))  # a whole-genome panel at the default batch size
    assert not model_module._dense_is_faster(on_gpu(limit // 2000 + 1, 2000))


def test_bf16_linear_multiplies_bfloat16_operands_into_float32():
    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 40)
    x = torch.randn(64, 300, requires_grad=True)
    g = torch.randn(64, 40)
    out = bf16_linear(x, layer)
    out.backward(g)

    def rounded(t):
        return t.detach().bfloat16().double()

    refs = {
        "out": (out, rounded(x) @ rounded(layer.weight).T + layer.bias.detach().double()),
        "weight grad": (layer.weight.grad, rounded(g).T @ rounded(x)),
        "input grad": (x.grad, rounded(g) @ rounded(layer.weight)),
    }
    for name, (got, ref) in refs.items():
        assert got.dtype == torch.float32, name
        assert (got.double() - ref).abs().max() / ref.abs().max() < 2**-8, name  # the result's rounding only
    for grad in (layer.weight.grad, x.grad):  # products of bfloat16 operands: bfloat16 results, not float32's
        assert torch.equal(grad, grad.bfloat16().float())
    assert torch.equal(layer.bias.grad, g.sum(0))
    # keep: bfloat16 output and gradient; the bias gradient is the float32 sum's bfloat16 rounding, as the weight's
    layer.zero_grad()
    out = bf16_linear(x, layer, keep=True)
    assert out.dtype == torch.bfloat16
    gb = g.bfloat16()
    out.backward(gb)
    exact = gb.double().sum(0)
    assert layer.bias.grad.dtype == torch.float32
    assert torch.equal(layer.bias.grad, exact.float().bfloat16().float())
    assert not torch.equal(layer.bias.grad, exact.float())  # rounded, not float32's sum


def test_bf16_linear_without_a_bias_adds_none():
    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 40, bias=False)
    x = torch.randn(64, 300)
    ref = x.bfloat16().double() @ layer.weight.detach().bfloat16().double().T
    out = bf16_linear(x, layer)
    assert out.dtype == torch.float32 and (out.double() - ref).abs().max() / ref.abs().max() < 2**-8
    kept = bf16_linear(x, layer, keep=True)
    assert kept.dtype == torch.bfloat16 and torch.allclose(kept.float(), out, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("layout,settings", [("csr", {}), ("dense", {}), ("csr", {"batch_interaction": True})])
def test_bf16_products_in_training_only_and_near_float32(layout, settings):
    counts, codes, labels = batch()
    if layout == "csr":  # the trainer's CPU minibatches
        counts = Counts.from_sparse_csr(counts.dense.to_sparse_csr())
    m = model(**settings).train()
    if settings:  # the batch-by-state term's layer (no bias) goes through bf16_linear too: make it matter
        with torch.no_grad():
            m.interaction.weight.normal_(0, 0.1)
    outs, grads = {}, {}
    for bf16 in (False, True):
        m.bf16_matmul = bf16
        m.zero_grad()
        outs[bf16] = loss(m, counts, codes, labels)
        outs[bf16].total.backward()
        grads[bf16] = {k: p.grad.clone() for k, p in m.named_parameters()}
    fp32, low = outs[False].total.item(), outs[True].total.item()
    assert low != fp32 and abs(low - fp32) < 1e-2 * abs(fp32)
    for k, g in grads[False].items():
        if g.norm() > 1e-4:  # the biases before BatchNorm have none
            assert torch.nn.functional.cosine_similarity(g.ravel(), grads[True][k].ravel(), dim=0) > 0.99, k
    m.eval()
    with torch.no_grad():
        plain = m.latent(counts)
        m.bf16_matmul = False
        assert torch.equal(plain, m.latent(counts))  # inference stays float32


def test_native_bf16_agrees_with_the_cpu_flags():
    flags = Path("/proc/cpuinfo")
    if not flags.exists():
        pytest.skip("no /proc/cpuinfo")
    words = set(flags.read_text().split())
    assert native_bf16() == bool({"amx_tile", "avx512_bf16"} & words)


def test_generalised_cross_entropy_is_its_formula_and_scales_the_pull_by_p_to_the_q():
    counts, codes, labels = batch()
    m = model(label_gce_q=0.7)
    z = torch.randn(40, m.n_latent, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = labels[:, 0].clamp(0, 3)
    weighted, w = m._label_columns(z, labels)
    p = torch.softmax(m.label_logits(z)[0].double(), -1).gather(1, y[:, None])[:, 0]
    cw = m.class_weight_0.double()[y]
    torch.testing.assert_close(weighted.double(), cw * (1 - p**0.7) / 0.7, rtol=1e-5, atol=1e-6)
    # its gradient in the logits is p^q times the cross-entropy's: a label the model finds unlikely pulls less
    logits = m.label_logits(z)[0].detach().requires_grad_()
    from bigatlas.model import gce

    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    (g_ce,) = torch.autograd.grad(ce.sum(), logits, retain_graph=True)
    (g_gce,) = torch.autograd.grad(gce(ce, 0.7).sum(), logits)
    torch.testing.assert_close(g_gce, g_ce * p.float()[:, None] ** 0.7, rtol=1e-4, atol=1e-6)
    plain, kept = model()._label_columns(z, labels)[0], cw > 0  # q -> 0: the cross-entropy (same weights)
    torch.testing.assert_close(
        gce(plain[kept] / cw[kept].float(), 1e-6) * cw[kept].float(), plain[kept], rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="label_gce_q must be in"):
        ModelConfig(label_gce_q=1.5)


def test_label_smoothing_is_its_formula_and_off_by_default():
    counts, codes, labels = batch()
    z = torch.randn(40, model().n_latent, generator=torch.Generator().manual_seed(4))
    y = labels[:, 0].clamp_min(0)
    m = model(label_smoothing=0.2)
    smoothed, w = m._label_columns(z, labels)
    logp = torch.log_softmax(m.label_logits(z)[0].double(), -1)
    ce = -logp.gather(1, y[:, None])[:, 0]
    cw = m.class_weight_0.double()[y] * (w > 0)
    # target 1 - e + e / K on the given label, e / K on the others
    torch.testing.assert_close(smoothed.double(), cw * (0.8 * ce - 0.2 * logp.mean(1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model()._label_columns(z, labels)[0].double(), cw * ce, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ModelConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="set one of them"):
        ModelConfig(label_smoothing=0.1, label_gce_q=0.7)


@pytest.mark.parametrize("likelihood,compiled", [("zinb", False), ("nb", False), ("zinb", True)])
def test_genes_a_cell_did_not_measure_leave_the_likelihood(likelihood, compiled):
    """With `measured`, each cell's NLL is the model's NLL on its measured genes alone: the softmax spread
    over those genes only, the zero-filled ones adding nothing (both the eager and the fused loss); a gene
    no cell of the batch measured gets no gradient into its mean's weights; all measured = no mask."""
    counts, codes, labels = batch(cells=12)
    m = model(likelihood=likelihood, dispersion="gene-cell", zi_gate="gene-cell")
    m.compiled_loss = compiled
    g = torch.Generator().manual_seed(3)
    panels = torch.rand(2, 30, generator=g) > 0.3
    panels[:, 4] = False  # measured by no cell
    measured = panels[torch.arange(12) % 2]
    x = counts.dense.clone()
    x[~measured] = 0  # what the store's zero-fill gives
    counts = Counts.from_sparse_csr(x.to_sparse_csr())
    z = torch.randn(12, m.z_mean.out_features, generator=g)
    w = torch.full((12,), 1 / 12)
    recon = m._reconstruction(z, codes, counts, w, w, measured)[0]
    logits, log_theta, gate = m.decoder_outputs(z, codes)
    for i in range(12):
        keep = measured[i]
        sub = Counts.from_dense(x[i : i + 1, keep])
        mu = torch.softmax(logits[i, keep], -1)[None] * sub.library.unsqueeze(1)
        theta = torch.exp(log_theta[i : i + 1, keep].clamp(-12.0, 12.0))
        ref = nll(sub, mu, theta, None if gate is None else gate[i : i + 1, keep])
        torch.testing.assert_close(recon[i : i + 1], ref, rtol=1e-5, atol=1e-3)
    m.zero_grad()
    recon, _, fused_loss, _ = m._reconstruction(z, codes, counts, w, w, measured)
    (fused_loss if fused_loss is not None else (w * recon).sum()).backward()
    assert float(m.px_scale.weight.grad[4].abs().sum()) == 0.0 and float(m.px_scale.bias.grad[4]) == 0.0
    assert m.px_scale.weight.grad[~panels.any(0)].abs().sum() == 0 and m.px_scale.weight.grad.abs().sum() > 0
    all_measured = torch.ones(1, 30, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            m._reconstruction(z, codes, counts, w, w, all_measured)[0], m._reconstruction(z, codes, counts, w, w)[0]
        )


@pytest.mark.parametrize("normalize_total", [None, 1e4])
def test_unmeasured_genes_are_filled_with_the_decoders_expected_counts_for_the_encoder(normalize_total):
    """encode(x, fill) is the encoder of x + fill on every input path (the first layer is linear); the fill is
    0 at measured genes and the decoder's batch-average mean elsewhere, scaled so the measured genes' means
    sum to the observed total; a cell that measured every gene is encoded as it is."""
    counts, codes, labels = batch(cells=12)
    m = model(normalize_total=normalize_total)
    g = torch.Generator().manual_seed(4)
    measured = torch.rand(12, 30, generator=g) > 0.25
    x = counts.dense * measured
    fill = torch.rand(12, 30, generator=g) * 3 * ~measured
    with torch.no_grad():
        want = m.encode(Counts.from_dense(x + fill))
        for given in (Counts.from_dense(x), Counts.from_sparse_csr(x.to_sparse_csr()), x):
            got = m.encode(given, fill)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        z = m.encode(Counts.from_dense(x))[0]
        library = x.sum(1)
        filled = m.unmeasured_fill(z, library, measured)
        assert (filled[measured] == 0).all() and (filled[~measured] > 0).all()
        s = torch.softmax(m._mean_logits(z, None), -1)
        mean = s * (library / (s * measured).sum(1)).unsqueeze(1)
        torch.testing.assert_close(filled[~measured], mean[~measured])
        torch.testing.assert_close((mean * measured).sum(1), library)
        cells = Counts.from_dense(x)
        torch.testing.assert_close(m.latent(cells, measured=torch.ones(1, 30, dtype=torch.bool)), m.latent(cells))
        twice = m.encode(cells, m.unmeasured_fill(m.encode(cells)[0], library, measured))[0]
        torch.testing.assert_close(m.latent(cells, measured=measured), twice)
        assert not torch.allclose(m.latent(cells, measured=measured), m.latent(cells))


def test_surgery_trains_on_the_filled_latent_and_genes_read_as_zero_stay_zero():
    """fill_in_training: the loss's latent is encode_measured's (embed's); genes in read_as_zero (some
    training store lacked them) are never filled, so a cell missing only those is encoded as it is."""
    counts, codes, labels = batch(cells=12)
    m = model()
    measured = torch.ones(1, 30, dtype=torch.bool)
    measured[0, :6] = False
    counts = Counts.from_dense(counts.dense * measured)
    q_mu, q_var = m.encode_measured(counts, measured)
    kl = (0.5 * (q_var + q_mu**2 - 1.0 - torch.log(q_var)).sum(1)).mean()
    m.fill_in_training = True
    torch.testing.assert_close(loss(m, counts, codes, labels, measured=measured).terms["kl"], kl)
    m.fill_in_training = False
    assert not torch.allclose(loss(m, counts, codes, labels, measured=measured).terms["kl"], kl)
    m.read_as_zero[:6] = True
    torch.testing.assert_close(m.latent(counts, measured=measured), m.latent(counts))
