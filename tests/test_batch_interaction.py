"""The batch-by-state term (ModelConfig.batch_interaction): each batch's own linear map from the latent to the
mean's logits beside the shared decoder, zero at the start, on by default, read from a detached z (the encoder
learns through the shared decoder alone), its size penalised in the training loss and left out of the held-out
loss, logged per epoch, and frozen with the decoder when a query is mapped (trained with it when the decoder is
unfrozen)."""

import argparse
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from batch_toy import reference_and_query

from bigatlas import AtlasVAE
from bigatlas.config import ModelConfig
from bigatlas.distributions import Counts
from bigatlas.flags import add_config_flags, config_values
from bigatlas.model import VAEModule
from bigatlas.query import ENCODER

GENES, KEYS = 30, [3, 4]


def module(**cfg) -> VAEModule:
    torch.manual_seed(0)
    return VAEModule(GENES, KEYS, [], ModelConfig(batch_interaction=True, **cfg)).eval()


def randomise(m: VAEModule):
    """Non-zero maps and embeddings, so that every part of the term shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.interaction.weight.copy_(torch.randn(m.interaction.weight.shape, generator=g) * 0.1)
        for emb in m.embeddings:
            emb.weight.copy_(torch.randn(emb.weight.shape, generator=g))


def by_hand(m: VAEModule, z, emb) -> torch.Tensor:
    """Σ_ij W[g, i, j] e_i z_j per cell and gene: the term as a map per batch (e) of the latent (z)."""
    w = m.interaction.weight.view(GENES, emb.shape[1], z.shape[1])
    return torch.einsum("gij,ci,cj->cg", w, emb, z)


def shared_only(m: VAEModule) -> VAEModule:
    """The same model without the term (every other weight shared)."""
    plain = VAEModule(GENES, KEYS, [], replace(m.cfg, batch_interaction=False)).eval()
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    assert not missing and unexpected == ["interaction.weight"]
    return plain


def test_the_term_is_a_linear_map_of_z_per_batch_beside_the_shared_decoder():
    """Zero at the start (the shared decoder's outputs exactly); then the mean logits are the shared decoder's plus
    W(e ⊗ z), and the dispersion and gate read the shared decoder alone. The batch-average cell (batch codes None)
    gets the map of the mean embedding rows."""
    m = module(dispersion="gene-cell")
    assert m.interaction.in_features == 16 * 8 * 2 and m.interaction.bias is None
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    codes = torch.tensor([[0, 1], [1, 3], [2, 0], [0, 2], [1, 1], [2, 3]])
    plain = shared_only(m)
    with torch.no_grad():
        for got, want in zip(m.decoder_outputs(z, codes), plain.decoder_outputs(z, codes)):
            assert torch.equal(got, want)
        randomise(m)
        plain = shared_only(m)
        logits, log_theta, gate = m.decoder_outputs(z, codes)
        ref_logits, ref_theta, ref_gate = plain.decoder_outputs(z, codes)
        emb = torch.cat([e(codes[:, i]) for i, e in enumerate(m.embeddings)], dim=1)
        assert torch.allclose(logits, ref_logits + by_hand(m, z, emb), atol=1e-5)
        assert not torch.allclose(logits, ref_logits, atol=1e-2)
        assert torch.equal(log_theta, ref_theta) and torch.equal(gate, ref_gate)
        mean_rows = torch.cat([e.weight.mean(0) for e in m.embeddings]).expand(len(z), -1)
        average = m._mean_logits(z, None)
        assert torch.allclose(average, plain._mean_logits(z, None) + by_hand(m, z, mean_rows), atol=1e-5)


def test_its_size_is_penalised_in_training_and_left_out_of_the_held_out_loss():
    """terms['interaction'] is the mean over training cells of the squared logit shifts summed over genes (its
    'val_' twin over the held-out cells); the training loss adds it at the penalty's weight, the held-out loss
    does not, and its gradient reaches the maps."""
    m = module(batch_interaction_penalty=0.5)
    randomise(m)
    g = torch.Generator().manual_seed(3)
    counts = Counts.from_dense(torch.poisson(torch.rand(24, GENES, generator=g) * 4))
    codes = torch.stack([torch.arange(24) % 3, torch.arange(24) % 4], dim=1)
    held = torch.arange(24) % 4 == 0

    def run(model):
        torch.manual_seed(4)
        return model(counts, codes, cell_mask=~held, eval_mask=held)

    out = run(m)
    q_mu, q_var = m.encode(counts)
    torch.manual_seed(4)
    z = q_mu + torch.sqrt(q_var) * torch.randn_like(q_mu)
    emb = torch.cat([e(codes[:, i]) for i, e in enumerate(m.embeddings)], dim=1)
    size = (by_hand(m, z, emb) ** 2).sum(1).detach()
    assert out.terms["interaction"].item() == pytest.approx(size[~held].mean().item(), rel=1e-4)
    assert out.terms["val_interaction"].item() == pytest.approx(size[held].mean().item(), rel=1e-4)
    without = module(batch_interaction_penalty=0.0)
    without.load_state_dict(m.state_dict())
    plain = run(without)
    assert (out.total - plain.total).item() == pytest.approx(0.5 * size[~held].mean().item(), rel=1e-3)
    assert torch.equal(out.terms["val_loss"], plain.terms["val_loss"])
    out.total.backward()
    assert m.interaction.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="batch_interaction_penalty must be at least 0"):
        ModelConfig(batch_interaction_penalty=-0.1)


def test_the_penalty_counts_only_the_genes_each_cells_store_measured():
    """With an outer gene join a cell's store may lack genes: their mean is 0 whatever the term's shift, so the
    penalty sums the squared shifts over the genes the cell measured only."""
    m = module()
    randomise(m)
    g = torch.Generator().manual_seed(5)
    measured = torch.rand(24, GENES, generator=g) > 0.3
    counts = Counts.from_dense(torch.poisson(torch.rand(24, GENES, generator=g) * 4) * measured)
    codes = torch.stack([torch.arange(24) % 3, torch.arange(24) % 4], dim=1)
    torch.manual_seed(6)
    out = m(counts, codes, measured=measured)
    q_mu, q_var = m.encode(counts)
    torch.manual_seed(6)
    z = q_mu + torch.sqrt(q_var) * torch.randn_like(q_mu)
    emb = torch.cat([e(codes[:, i]) for i, e in enumerate(m.embeddings)], dim=1)
    size = by_hand(m, z, emb).detach() ** 2
    assert out.terms["interaction"].item() == pytest.approx((size * measured).sum(1).mean().item(), rel=1e-4)
    assert out.terms["interaction"].item() < 0.8 * size.sum(1).mean().item()  # the lacking genes' shifts left out


def test_on_by_default_and_unset_means_the_rule_of_run_dirs_saved_while_it_was_the_default():
    """The term is on by default, with label keys or without. Unset (run dirs saved while that was the default)
    it is on without label keys and off with them, as they were trained. Either can be chosen."""
    on = ModelConfig()
    assert on.batch_interaction is True and on.interaction(False) and on.interaction(True)
    assert hasattr(VAEModule(GENES, KEYS, [], on), "interaction")
    assert hasattr(VAEModule(GENES, KEYS, [4], on), "interaction")
    assert not hasattr(VAEModule(GENES, [], [], on), "interaction")  # no batch key: nothing to map
    unset = ModelConfig(batch_interaction=None)
    assert unset.interaction(False) and not unset.interaction(True)
    assert hasattr(VAEModule(GENES, KEYS, [], unset), "interaction")
    assert not hasattr(VAEModule(GENES, KEYS, [4], unset), "interaction")
    assert not hasattr(VAEModule(GENES, KEYS, [4], ModelConfig(batch_interaction=False)), "interaction")
    p = argparse.ArgumentParser()
    add_config_flags(p, ModelConfig, "model")
    for flags, want in (([], {}), (["--no-batch-interaction"], False), (["--batch-interaction"], True)):
        got = config_values(p.parse_args(flags), ModelConfig)
        assert got == ({} if want == {} else {"batch_interaction": want})


def test_a_labelled_run_dir_saved_with_the_term_unset_loads_without_it(tmp_path):
    """A run dir whose config.json has batch_interaction unset and label keys was trained without the term: it
    loads without it and embeds as it did."""
    data, _ = reference_and_query(tmp_path)
    settings = {"model": {"batch_interaction": None}, "train": {"max_epochs": 1}}
    model = AtlasVAE(str(data), batch_key="dataset_id", label_keys=["cell_type"], **settings).fit(tmp_path / "run")
    assert not hasattr(model.module, "interaction")
    loaded = AtlasVAE.load(tmp_path / "run")
    assert loaded.config.model.batch_interaction is None and not hasattr(loaded.module, "interaction")
    assert np.array_equal(loaded.get_latent(str(data)), model.get_latent(str(data)))


def test_detached_the_encoder_learns_through_the_shared_decoder_alone():
    """With batch_interaction_detach (the default) the term's gradient stops at z: the encoder's gradients are
    those of a model whose term reads a detached copy of z, and differ from the attached term's; the loss and the
    maps' gradients are the same either way."""
    g = torch.Generator().manual_seed(5)
    counts = Counts.from_dense(torch.poisson(torch.rand(16, GENES, generator=g) * 4))
    codes = torch.stack([torch.arange(16) % 3, torch.arange(16) % 4], dim=1)

    def grads(model):
        model.zero_grad()
        torch.manual_seed(6)
        out = model(counts, codes)
        out.total.backward()
        return out.total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    detached = module()
    assert detached.cfg.batch_interaction_detach
    randomise(detached)
    attached = module(batch_interaction_detach=False)
    attached.load_state_dict(detached.state_dict())
    by_copy = module(batch_interaction_detach=False)
    by_copy.load_state_dict(detached.state_dict())
    linear = by_copy.interaction
    by_copy._wide = lambda layer, x: layer(x.detach()) if layer is linear else VAEModule._wide(by_copy, layer, x)
    cut, want = grads(detached), grads(by_copy)
    full = grads(attached)
    assert cut[0] == pytest.approx(full[0], rel=1e-6) == want[0]
    encoder = [n for n in cut[1] if n.startswith(ENCODER)]
    assert encoder and all(torch.allclose(cut[1][n], want[1][n], atol=1e-6) for n in encoder)
    assert any(not torch.allclose(cut[1][n], full[1][n], atol=1e-4) for n in encoder)
    assert torch.allclose(cut[1]["interaction.weight"], full[1]["interaction.weight"], atol=1e-6)


def test_a_run_logs_the_term_and_a_mapped_query_keeps_the_references_maps(tmp_path):
    data, query = reference_and_query(tmp_path)
    settings = {"model": {"batch_interaction": True}, "train": {"max_epochs": 2}}
    model = AtlasVAE(str(data), batch_key="dataset_id", **settings).fit(tmp_path / "run")
    log = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert (log["interaction"] > 0).all() and (log["val_interaction"] > 0).all()
    maps = model.module.interaction.weight.detach().clone()
    before = model.get_latent(str(data))
    mapped = model.map_query(query, tmp_path / "mapped", epochs=1)  # only the new batches' rows train
    assert mapped.config.model.batch_interaction
    assert torch.equal(mapped.module.interaction.weight, maps)
    assert np.array_equal(mapped.get_latent(str(data)), before)
    tuned = model.map_query(query, tmp_path / "tuned", epochs=3, unfreeze_decoder=True)  # the maps are decoder
    assert not torch.equal(tuned.module.interaction.weight, maps)
