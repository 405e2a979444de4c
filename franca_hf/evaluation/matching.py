"""Matching clusters to classes: exact Hungarian (one-to-one) and many-to-one (overclustering)."""

import numpy as np


def hungarian(cost: np.ndarray) -> np.ndarray:
    """Exact minimum-cost assignment of the rows of `cost` (R, C), R <= C, to distinct columns: (R,) column per row.

    The O(R^2 C) shortest-augmenting-path algorithm with potentials (Kuhn-Munkres, Jonker-Volgenant form).
    """
    cost = np.asarray(cost, dtype=np.float64)
    rows, cols = cost.shape
    if rows > cols:
        raise ValueError(f"hungarian assigns rows to distinct columns; got {rows} rows for {cols} columns.")
    u, v = np.zeros(rows + 1), np.zeros(cols + 1)
    owner = np.zeros(cols + 1, dtype=np.int64)  # owner[j]: 1-based row assigned to column j (0: none)
    way = np.zeros(cols + 1, dtype=np.int64)
    for row in range(1, rows + 1):
        owner[0], column = row, 0
        slack, used = np.full(cols + 1, np.inf), np.zeros(cols + 1, dtype=bool)
        while owner[column] != 0:
            used[column] = True
            current = owner[column]
            free = ~used[1:]
            reduced = cost[current - 1] - u[current] - v[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better] = reduced[better]
            way[1:][better] = column
            candidates = np.where(free, slack[1:], np.inf)
            nearest = int(np.argmin(candidates)) + 1
            delta = candidates[nearest - 1]
            u[owner[used]] += delta
            v[used] -= delta
            slack[1:][free] -= delta
            column = nearest
        while column:
            previous = way[column]
            owner[column] = owner[previous]
            column = previous
    assignment = np.empty(rows, dtype=np.int64)
    for column in range(1, cols + 1):
        if owner[column]:
            assignment[owner[column] - 1] = column - 1
    return assignment


def match_clusters(overlap: np.ndarray) -> np.ndarray:
    """(K,) class of each cluster from the (K, C) pixel overlap counts: the one-to-one assignment of largest total
    overlap (Hungarian) when K <= C, each cluster to the class it overlaps most (many-to-one) when K > C."""
    clusters, classes = overlap.shape
    if clusters <= classes:
        return hungarian(-overlap)
    return overlap.argmax(axis=1)
