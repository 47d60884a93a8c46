"""SFNet's loss weights in the project's flow units (MODELS.md section 5, "Required test").

The paper's weights (3, 16, 0.5) were tuned with the released code, whose flows are in grid_sample units on the
G-point grid ``linspace(-1, 1, G)``. A reference implementation of eq. 4 in those units, written here from the paper
with plain ``grid_sample``, must equal ``ops.sfnet``'s cell-unit loss given the converted weights
(``sfnet_loss_weights``), and the unconverted weights must be off by exactly ((G-1)/2)^2 (flow consistency) and
(G-1)/2 (smoothness), term by term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops.sfnet import (
    flow_consistency_loss,
    mask_consistency_loss,
    sfnet_loss,
    sfnet_loss_weights,
    smoothness_loss,
)

D = torch.float64
PAPER = (3.0, 16.0, 0.5)  # lambda_mask, lambda_flow, lambda_smooth (sec. 4.1)


def sample(x: torch.Tensor, flow_norm: torch.Tensor) -> torch.Tensor:
    """x at p + F(p), everything in normalised units: positions linspace(-1, 1, G), align_corners=True, zeros."""
    n, _, h, w = flow_norm.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=D), torch.linspace(-1, 1, w, dtype=D), indexing="ij")
    grid = torch.stack((xs + flow_norm[:, 0], ys + flow_norm[:, 1]), dim=-1)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def reference_terms(fs, ft, ms, mt) -> dict:
    """Eq. 7, 8-9 and 10 in normalised flow units; forward differences for the gradient, |N_F| >= 1 per sample."""
    def count(m):
        return m.sum(dim=(1, 2, 3)).clamp_min(1.0)

    def cycle(f, g, m):
        return ((((f + sample(g, f)) * m) ** 2).sum(dim=(1, 2, 3)) / count(m)).mean()

    def smooth(f, m):
        gx = (f[..., :, 1:] - f[..., :, :-1]) * m[..., :, :-1]
        gy = (f[..., 1:, :] - f[..., :-1, :]) * m[..., :-1, :]
        return ((gx.abs().sum(dim=(1, 2, 3)) + gy.abs().sum(dim=(1, 2, 3))) / count(m)).mean()

    return {
        "mask": ((ms - sample(mt, fs)) ** 2).mean() + ((mt - sample(ms, ft)) ** 2).mean(),
        "flow": cycle(fs, ft, ms) + cycle(ft, fs, mt),
        "smooth": smooth(fs, ms) + smooth(ft, mt),
    }


@pytest.mark.parametrize("grid", [16, 20])
def test_converted_weights_reproduce_the_papers_objective(grid):
    gen = torch.Generator().manual_seed(grid)
    fs_norm, ft_norm = (0.15 * torch.randn(3, 2, grid, grid, generator=gen, dtype=D) for _ in range(2))
    ms, mt = ((torch.rand(3, 1, grid, grid, generator=gen, dtype=D) > 0.4).to(D) for _ in range(2))
    cells = (grid - 1) / 2  # one normalised unit in cells
    fs, ft = fs_norm * cells, ft_norm * cells

    ref = reference_terms(fs_norm, ft_norm, ms, mt)
    ours = {"mask": mask_consistency_loss(fs, ft, ms, mt), "flow": flow_consistency_loss(fs, ft, ms, mt),
            "smooth": smoothness_loss(fs, ft, ms, mt)}
    paper_objective = sum(w * ref[k] for w, k in zip(PAPER, ("mask", "flow", "smooth")))
    w_mask, w_flow, w_smooth = sfnet_loss_weights(*PAPER, grid)
    converted = sfnet_loss(fs, ft, ms, mt, lambda_mask=w_mask, lambda_flow=w_flow, lambda_smooth=w_smooth)["loss"]
    assert ref["flow"] > 1e-3 and ref["smooth"] > 1e-3  # the terms that carry units are not trivially zero
    assert abs(converted.item() - paper_objective.item()) < 1e-10
    assert abs((w_mask * ours["mask"] + w_flow * ours["flow"] + w_smooth * ours["smooth"]).item()
               - paper_objective.item()) < 1e-10

    # Unconverted, each weighted term is off by its unit factor: 90.25x / 9.5x at G = 20 (56.25x / 7.5x at 16).
    assert (PAPER[0] * ours["mask"] / (PAPER[0] * ref["mask"])).item() == pytest.approx(1.0, rel=1e-10)
    assert (PAPER[1] * ours["flow"] / (PAPER[1] * ref["flow"])).item() == pytest.approx(cells**2, rel=1e-10)
    assert (PAPER[2] * ours["smooth"] / (PAPER[2] * ref["smooth"])).item() == pytest.approx(cells, rel=1e-10)
    if grid == 20:
        assert (cells**2, cells) == (90.25, 9.5)
