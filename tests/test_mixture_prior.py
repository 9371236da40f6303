"""The Gaussian-mixture prior on z (prior_components > 0): its KL estimate is the posterior's entropy and the
mixture's density at the sample, it is unbiased for the closed form where the mixture is N(0, I), it learns, and
a default model (no mixture) draws exactly what it drew before."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from test_model import batch, loss

from bigatlas.config import ModelConfig
from bigatlas.model import VAEModule


def module(components: int, labels=(4,)) -> VAEModule:
    torch.manual_seed(0)
    return VAEModule(30, [3], list(labels), ModelConfig(prior_components=components))


def test_kl_is_the_entropy_and_the_mixture_density_at_the_sample():
    m = module(3)
    with torch.no_grad():
        m.prior_logvar.copy_(torch.randn(m.prior_logvar.shape) * 0.5)
        m.prior_logits.copy_(torch.tensor([0.3, -1.0, 0.5]))
    g = torch.Generator().manual_seed(2)
    mu, var = torch.randn(6, m.n_latent, generator=g), torch.rand(6, m.n_latent, generator=g) + 0.2
    z = mu + var.sqrt() * torch.randn(6, m.n_latent, generator=g)
    got = m._kl(z, mu, var).detach().double().numpy()

    means, variances = m.prior_means.detach().double().numpy(), m.prior_logvar.detach().double().exp().numpy()
    log_w = torch.log_softmax(m.prior_logits.detach().double(), 0).numpy()
    zs = z.double().numpy()
    log_p = logsumexp(
        [log_w[c] + multivariate_normal(means[c], np.diag(variances[c])).logpdf(zs) for c in range(3)], axis=0
    )
    entropy = [multivariate_normal(np.zeros(m.n_latent), np.diag(v)).entropy() for v in var.double().numpy()]
    np.testing.assert_allclose(got, -np.asarray(entropy) - log_p, rtol=1e-5, atol=1e-4)


def test_one_standard_normal_component_gives_the_closed_form_kl_on_average():
    m = module(1)
    with torch.no_grad():
        m.prior_means.zero_()
    g = torch.Generator().manual_seed(3)
    mu, var = (
        torch.randn(1, 10, generator=g).expand(200_000, -1),
        (torch.rand(1, 10, generator=g) + 0.1).expand(200_000, -1),
    )
    z = mu + var.sqrt() * torch.randn(200_000, 10, generator=g)
    estimate = m._kl(z, mu, var).detach()
    closed = 0.5 * (var + mu**2 - 1.0 - torch.log(var)).sum(1)[0]
    assert abs(estimate.mean() - closed) < 4 * estimate.std() / 200_000**0.5
    # and a prior that is not N(0, I) gives another KL: the mixture is read
    with torch.no_grad():
        m.prior_means.fill_(1.0)
    assert abs(m._kl(z, mu, var).detach().mean() - closed) > 0.5


def test_the_prior_learns_and_the_default_model_is_unchanged():
    counts, codes, labels = batch()
    m = module(4).train()
    out = loss(m, counts, codes, labels, kl_weight=0.3)
    out.total.backward()
    for p in (m.prior_means, m.prior_logvar, m.prior_logits):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    # the mixture's init comes from a fork of the random stream: every other weight is the default model's
    plain = module(0)
    mixed = {k: v for k, v in m.state_dict().items() if not k.startswith("prior_")}
    assert mixed.keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(mixed[k], v)


def test_the_default_mixture_is_for_models_without_labels():
    torch.manual_seed(0)
    assert VAEModule(30, [3], [], ModelConfig()).prior_means.shape == (32, 16)
    assert not hasattr(VAEModule(30, [3], [4], ModelConfig()), "prior_means")


def test_a_negative_number_of_components_is_refused():
    with pytest.raises(ValueError, match="prior_components"):
        ModelConfig(prior_components=-1)
