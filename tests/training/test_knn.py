"""k-NN evaluation: the DINO weighted vote, truncate-then-normalise per Matryoshka dim."""

import torch
import torch.nn.functional as F

from franca_hf.training.knn import format_knn_table, knn_accuracy_by_dim, knn_predict


def test_weighted_vote_follows_the_nearest_neighbours():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_predict(bank, labels, queries, num_classes=2, k=3).tolist() == [0, 1]
    # with k covering the whole bank, a colder temperature lets the two close neighbours outvote three far ones
    assert knn_predict(bank, labels, queries[:1], 2, k=5, temperature=0.01).tolist() == [0]
    assert knn_predict(bank, labels, queries[:1], 2, k=5, temperature=100.0).tolist() == [1]


def test_accuracy_per_dim_truncates_then_normalises():
    torch.manual_seed(0)
    labels = torch.arange(200) % 2
    informative = (labels.float() * 2 - 1)[:, None] * torch.ones(200, 2)  # class in the first 2 channels
    noise = torch.randn(200, 14) * 3  # no class information after them
    features = torch.cat([informative + 0.1 * torch.randn(200, 2), noise], dim=1)
    accuracy = knn_accuracy_by_dim(features[:100], labels[:100], features[100:], labels[100:], dims=[2, 16])
    assert accuracy[2] == 100.0
    assert accuracy[16] < 90.0  # the noisy channels dilute the neighbourhoods
    assert "dim 2" in format_knn_table(accuracy) and "100.0" in format_knn_table(accuracy)
