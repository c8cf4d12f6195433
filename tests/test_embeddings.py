"""Embedding diagnostics against brute-force loops."""
import numpy as np
import torch

from steel_fsd.evaluation.embeddings import distance_stats, nearest_prototype_confusion, pca_2d


def data(seed=0, n=40, d=5, c=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    protos = torch.randn(c, d, generator=g)
    z = protos[labels] + 0.8 * torch.randn(n, d, generator=g)
    return z.double(), labels, protos.double()


def test_confusion_matches_loop():
    z, y, p = data()
    cm = nearest_prototype_confusion(z, y, p)
    expected = np.zeros((3, 3), int)
    for i in range(len(z)):
        dists = [float(((z[i] - p[c]) ** 2).sum()) for c in range(3)]
        expected[int(y[i]), int(np.argmin(dists))] += 1
    assert (cm == expected).all() and cm.sum() == len(z)


def test_distance_stats_match_loops():
    z, y, p = data(1)
    s = distance_stats(z, y, p)
    n = len(z)
    dist = lambda a, b: float(((a - b) ** 2).sum().sqrt())  # noqa: E731
    intra = [dist(z[i], z[j]) for i in range(n) for j in range(n) if i != j and y[i] == y[j]]
    inter = [dist(z[i], z[j]) for i in range(n) for j in range(n) if y[i] != y[j]]
    assert abs(s["intra_class"] - np.mean(intra)) < 1e-9 and abs(s["inter_class"] - np.mean(inter)) < 1e-9
    assert abs(s["to_own_prototype"] - np.mean([dist(z[i], p[y[i]]) for i in range(n)])) < 1e-9
    others = [min(dist(z[i], p[c]) for c in range(3) if c != y[i]) for i in range(n)]
    assert abs(s["to_nearest_other_prototype"] - np.mean(others)) < 1e-9
    assert s["margin_ratio"] > 1  # the clusters of data() are separated


def test_pca_keeps_the_leading_variance():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 0.1, 0.1, 0.1, 0.1])
    coords, _ = pca_2d(x)
    assert coords.var(0).sum() / x.var(0).sum() > 0.99
