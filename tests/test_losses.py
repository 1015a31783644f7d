"""Losses (docs/math.md §5): randomness only from the per-sample generators, the blur loss's input and target."""

from __future__ import annotations

import pytest
import torch

from relay_diffusion.core import blur as forward
from relay_diffusion.core import losses
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.toy import GaussianToyDenoiser


class Recorder(torch.nn.Module):
    """Records what the loss feeds the network; returns zeros."""

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.x, self.sigma, self.labels = x, sigma, class_labels
        return torch.zeros_like(x)


def images(n=4, c=3, r=8):
    return torch.randn(n, c, r, r, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)


ALL = [losses.EDMLoss(), losses.VPLoss(), losses.VELoss(), losses.BlurLoss(losses.BlurLossConfig(BlurProcess(up_scale=4)))]


@pytest.mark.parametrize("loss", ALL, ids=lambda loss: type(loss).__name__)
def test_loss_depends_on_sample_seed_only(loss):
    y = images()
    net = GaussianToyDenoiser(3, 8)
    full = loss(net, y, SeedGenerators([10, 11, 12, 13]))
    part = loss(net, y[2:], SeedGenerators([12, 13]))
    assert full.shape == y.shape and torch.isfinite(full).all()
    torch.testing.assert_close(full[2:], part, rtol=0, atol=0)
    again = loss(net, y, SeedGenerators([10, 11, 12, 13]))
    torch.testing.assert_close(full, again, rtol=0, atol=0)
    g = torch.get_rng_state()
    loss(net, y, SeedGenerators([1, 2, 3, 4]))
    assert torch.equal(g, torch.get_rng_state()), "the global RNG must not be touched"


def test_blur_loss_draw_order_and_target():
    cfg = losses.BlurLossConfig(BlurProcess(up_scale=4, block_scale=0.15))
    y = images()
    rec = Recorder()
    out = losses.BlurLoss(cfg)(rec, y, SeedGenerators([0, 1, 2, 3]))
    rng = SeedGenerators([0, 1, 2, 3])
    u = rng.rand([1, 1, 1], dtype=torch.float32)
    sigma, b, w = losses.blur_loss_levels(u, cfg)
    eps, eps_b = rng.randn_like(y), rng.randn_like(y)
    torch.testing.assert_close(rec.x, losses.blur_loss_input(y, sigma, b, eps, eps_b, cfg).float())
    torch.testing.assert_close(rec.sigma, sigma.float().reshape(-1))
    torch.testing.assert_close(out, w.float() * y.square())  # target is the sharp image; the net returned 0
    assert (sigma >= 0.0075 * 0.9).all() and (w <= losses.MAX_WEIGHT).all()


def test_blur_loss_levels_cover_the_truncated_range():
    cfg = losses.BlurLossConfig()
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    sigma, b, w = losses.blur_loss_levels(u, cfg)
    assert (sigma[1:] >= sigma[:-1]).all() and (b[1:] >= b[:-1]).all()
    assert b.max().item() == pytest.approx(cfg.process.blur_sigma_max)
    assert sigma.max().item() == pytest.approx(float(torch.exp(forward.normal_icdf(torch.tensor(cfg.process.prob_length))
                                                             * cfg.P_std + cfg.P_mean)))


def test_blur_loss_rejects_indivisible_images():
    with pytest.raises(ValueError, match="up_scale=4"):
        losses.BlurLoss(losses.BlurLossConfig(BlurProcess(up_scale=4)))(Recorder(), torch.zeros(1, 3, 6, 6), SeedGenerators([0]))


def test_label_dropout_drops_whole_labels_at_its_rate():
    n = 2000
    labels = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).float()
    rec = Recorder()
    losses.EDMLoss(label_dropout=0.3)(rec, torch.zeros(n, 1, 2, 2), SeedGenerators(range(n)), labels)
    dropped = (rec.labels.sum(1) == 0).float().mean().item()
    assert abs(dropped - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5
    kept = rec.labels.sum(1) != 0
    torch.testing.assert_close(rec.labels[kept], labels[kept])


def test_augment_pipe_receives_rng_and_its_labels_reach_the_net():
    seen = {}

    def pipe(imgs, rng):
        seen["n"] = len(rng)
        return imgs.flip(-1), torch.ones(imgs.shape[0], 9)

    class Net(Recorder):
        def forward(self, x, sigma, class_labels=None, augment_labels=None):
            self.aug = augment_labels
            return super().forward(x, sigma, class_labels)

    net = Net()
    losses.VELoss()(net, images(), SeedGenerators(range(4)), augment_pipe=pipe)
    assert seen["n"] == 4 and net.aug.shape == (4, 9)
