import pytest
import torch

from melanogan.classify.coral import coral_penalty, moment_distance

# Two sources of two images each, 2-D features, worked out by hand:
# a: mean (1, 0), centred rows (-1, 0), (1, 0) -> covariance [[2, 0], [0, 0]] (divisor n - 1 = 1)
# b: mean (1, 2), centred rows (0, -1), (0, 1) -> covariance [[0, 0], [0, 2]]
A = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
B = torch.tensor([[1.0, 1.0], [1.0, 3.0]])


def test_moment_distance_is_the_mean_squared_difference_of_means_plus_that_of_covariances():
    # means differ by (0, -2): mean of squares 2; covariances differ by diag(2, -2): mean of the 4 squares 2
    assert float(moment_distance(A, B)) == pytest.approx(4.0)
    assert float(moment_distance(B, A)) == pytest.approx(4.0)
    # a shifted copy: only the means differ, by (3, 3) -> 9; the same set: 0
    assert float(moment_distance(A, A + 3.0)) == pytest.approx(9.0)
    assert float(moment_distance(A, A)) == 0.0
    # the covariance is unbiased (n - 1): three rows 0, 1, 2 on one feature have variance 1, not 2/3, so
    # against two rows of 1 (same mean, variance 0) the distance is 1 (biased, it would be 4/9)
    c = torch.tensor([[0.0], [1.0], [2.0]])
    assert float(moment_distance(c, torch.tensor([[1.0], [1.0]]))) == pytest.approx(1.0)


def test_the_penalty_compares_the_batch_sources_whatever_the_order_of_the_images():
    features = torch.cat([A, B])
    groups = torch.tensor([0, 0, 1, 1])
    assert float(coral_penalty(features, groups)) == pytest.approx(4.0)
    order = torch.tensor([2, 0, 3, 1])  # interleaved
    assert float(coral_penalty(features[order], groups[order])) == pytest.approx(4.0)
    # the group codes are names, not positions: 7 and 3 compare the same two sets
    assert float(coral_penalty(features, torch.tensor([7, 7, 3, 3]))) == pytest.approx(4.0)


def test_three_sources_average_their_pairs_and_a_source_with_one_image_is_left_out():
    c = A + 3.0  # a vs c: 9 (means), b vs c: means (1, 2) vs (4, 3) -> (9 + 1) / 2 = 5, covariances 2 -> 7
    features = torch.cat([A, B, c, torch.tensor([[100.0, -100.0]])])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # source 3 has one image: no covariance, not compared
    assert float(coral_penalty(features, groups)) == pytest.approx((4.0 + 9.0 + 7.0) / 3)


def test_one_comparable_source_gives_zero_that_is_still_part_of_the_graph():
    features = torch.cat([A, B]).requires_grad_()
    for groups in (torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1])):
        penalty = coral_penalty(features, groups)
        assert float(penalty) == 0.0
        penalty.backward()  # DDP needs the same parameters used on every rank, whatever the batch holds
        assert torch.equal(features.grad, torch.zeros_like(features))


def test_the_gradient_moves_the_sources_towards_each_other_and_bf16_features_are_compared_in_float32():
    features = torch.cat([A, A + 3.0]).requires_grad_()
    coral_penalty(features, torch.tensor([0, 0, 1, 1])).backward()
    # d/d(mean_a) of mean((mean_a - mean_b)^2) over 2 features is (mean_a - mean_b) = -3 per feature,
    # shared by the 2 images of a: -1.5 each; b's images get +1.5
    assert torch.allclose(features.grad, torch.tensor([[-1.5, -1.5]] * 2 + [[1.5, 1.5]] * 2))
    penalty = coral_penalty(torch.cat([A, B]).bfloat16(), torch.tensor([0, 0, 1, 1]))
    assert penalty.dtype == torch.float32 and float(penalty) == pytest.approx(4.0)


def test_shapes_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match="groups"):
        coral_penalty(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
