"""kNN prediction maths and the OnlineKNN callback."""

from __future__ import annotations

import math

import torch

from lightning_mim.callbacks.knn import knn_predict


def test_knn_weighted_vote_by_hand() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.1]])
    # k = 3: class 0 gets exp(cos0 / t), class 1 gets exp(cos1 / t) + exp(cos2 / t)
    q = query[0] / query[0].norm()
    sims = bank @ q
    t = 0.07
    class0, class1 = math.exp(sims[0] / t), math.exp(sims[1] / t) + math.exp(sims[2] / t)
    assert knn_predict(query, bank, labels, 2, k=3, temperature=t).item() == int(class1 > class0)
    # k = 1: the nearest neighbour decides
    assert knn_predict(query, bank, labels, 2, k=1).item() == 0
    # a hot temperature makes it a count: two votes for class 1 beat one for class 0
    assert knn_predict(query, bank, labels, 2, k=3, temperature=100.0).item() == 1


def test_knn_separable_clusters_and_chunking() -> None:
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 5
    bank_labels = torch.arange(4).repeat_interleave(50)
    bank = centres[bank_labels] + torch.randn(200, 16)
    query_labels = torch.arange(4).repeat(10)
    query = centres[query_labels] + torch.randn(40, 16)
    preds = knn_predict(query, bank, bank_labels, 4, k=20, chunk_size=7)
    assert torch.equal(preds, query_labels)
