"""DINO's weighted k-NN classifier, the pure part (Caron et al. 2021, ``eval_knn.py``).

Shared by ``python -m eval.knn`` (frozen checkpoints) and the trainer's online k-NN monitor
(``dino/monitor.py``), so both score with the same vote: each test image takes the k most
cosine-similar training images and neighbour j votes for its class with ``exp(sim_j / T)``.
"""

from __future__ import annotations

import numpy as np
import torch


def knn_vote(
    sims: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """``(B, C)`` class scores: ``sum_j [label_j == c] * exp(sim_j / T)`` over the k neighbours."""
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=sims.device)
    return scores.scatter_add_(1, neighbor_labels.long(), weights)


def search_torch(
    train: torch.Tensor, test: torch.Tensor, k: int, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices) ``(B, k)`` of the k largest inner products, in chunks of tests."""
    sims, idx = [], []
    for i in range(0, len(test), chunk):
        s = test[i : i + chunk] @ train.T
        v, j = s.topk(min(k, train.shape[0]), dim=1, largest=True, sorted=True)
        sims.append(v)
        idx.append(j)
    return torch.cat(sims), torch.cat(idx)


def search_faiss(train: torch.Tensor, test: torch.Tensor, k: int):
    import faiss

    index = faiss.IndexFlatIP(train.shape[1])
    if train.is_cuda and hasattr(faiss, "StandardGpuResources"):
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, train.device.index or 0, index)
    index.add(np.ascontiguousarray(train.float().cpu().numpy()))
    s, j = index.search(np.ascontiguousarray(test.float().cpu().numpy()), min(k, train.shape[0]))
    return torch.from_numpy(s).to(test.device), torch.from_numpy(j).to(test.device)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def knn_scores(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    backend: str = "auto",
    chunk: int = 256,
) -> torch.Tensor:
    """Weighted k-NN class scores ``(B, C)`` of L2-normalised features."""
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    if use_faiss:
        sims, idx = search_faiss(train_f, test_f, k)
    else:
        sims, idx = search_torch(train_f, test_f, k, chunk)
    return knn_vote(sims, train_y.to(idx.device)[idx], num_classes, temperature)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the ``k`` best-scored classes."""
    order = scores.argsort(dim=1, descending=True)
    hit = order == labels.view(-1, 1).to(order.device)
    return {f"top{k}": float(hit[:, :k].any(1).double().mean()) * 100 for k in ks}


def top1_se(top1: float, n: int) -> float:
    """Binomial standard error of a top-1 accuracy in percent over ``n`` images."""
    p = top1 / 100
    return 100 * float(np.sqrt(p * (1 - p) / max(n, 1)))
