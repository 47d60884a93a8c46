"""ops.sfnet against the authors' released code (cvlab-yonsei/SFNet): each level's cosine correlation is clipped at
zero before the levels are multiplied, and the paper's loss weights are converted to the project's flow units."""

from __future__ import annotations

import math

import pytest
import torch

from ops.sfnet import (
    combine_levels,
    correlation_4d,
    hard_argmax,
    kernel_soft_argmax,
    sfnet_flows,
    sfnet_loss_weights,
)

D = torch.float64


def features(vectors: list[list[float]]) -> torch.Tensor:
    """(1, C, 1, K) feature map whose K cells hold the given C-dim vectors, left to right."""
    return torch.tensor(vectors, dtype=D).T.reshape(1, len(vectors[0]), 1, len(vectors))


def test_two_negative_cosines_do_not_score_positive():
    # One source cell and three target cells. Both levels disagree strongly with target cell 0 (cosine -0.9) and
    # agree weakly with target cell 2 (cosine 0.3); cell 1 is orthogonal. The true match is cell 2.
    source = features([[1.0, 0.0]])
    target = features([[-0.9, math.sqrt(1 - 0.81)], [0.0, 1.0], [0.3, math.sqrt(1 - 0.09)]])
    clipped = combine_levels(correlation_4d(source, target), correlation_4d(source, target))
    torch.testing.assert_close(clipped.flatten(), torch.tensor([0.0, 0.0, 0.09], dtype=D))
    assert hard_argmax(clipped)[0, :, 0, 0].tolist() == [2.0, 0.0]
    assert kernel_soft_argmax(clipped)[0, 0, 0, 0].item() == pytest.approx(2.0, abs=1e-6)
    # Unclipped, (-0.9) x (-0.9) = 0.81 outscores 0.3 x 0.3 = 0.09 and the flow points at the wrong cell.
    product = combine_levels(correlation_4d(source, target, relu=False), correlation_4d(source, target, relu=False))
    torch.testing.assert_close(product.flatten(), torch.tensor([0.81, 0.0, 0.09], dtype=D))
    assert hard_argmax(product)[0, :, 0, 0].tolist() == [0.0, 0.0]


def test_clip_is_relu_of_the_cosine_and_changes_flows_on_random_features():
    gen = torch.Generator().manual_seed(0)
    fa1, fb1, fa2, fb2 = (torch.randn(2, 32, 12, 12, generator=gen, dtype=D) for _ in range(4))
    raw1, raw2 = correlation_4d(fa1, fb1, relu=False), correlation_4d(fa2, fb2, relu=False)
    assert (raw1 < 0).float().mean() > 0.3  # random features: many negative cosines
    torch.testing.assert_close(correlation_4d(fa1, fb1), raw1.clamp_min(0), rtol=0, atol=0)
    clipped = combine_levels(correlation_4d(fa1, fb1), correlation_4d(fa2, fb2))
    assert (clipped >= 0).all()
    flows_clipped = sfnet_flows(clipped, method="hard")[0]
    flows_raw = sfnet_flows(combine_levels(raw1, raw2), method="hard")[0]
    assert (flows_clipped - flows_raw).abs().amax() >= 5  # cells: the switch matters


@pytest.mark.parametrize("grid, w_flow, w_smooth", [(20, 16 / 90.25, 0.5 / 9.5), (16, 16 / 56.25, 0.5 / 7.5)])
def test_loss_weights_for_cell_flows(grid, w_flow, w_smooth):
    assert sfnet_loss_weights(3.0, 16.0, 0.5, grid) == pytest.approx((3.0, w_flow, w_smooth), rel=1e-12)
    assert sfnet_loss_weights(3.0, 16.0, 0.5, 20)[1:] == pytest.approx((0.1773, 0.0526), abs=1e-4)  # MODELS.md table
    for bad in (1, 0, 7.5):
        with pytest.raises(ValueError, match="grid"):
            sfnet_loss_weights(3.0, 16.0, 0.5, bad)
