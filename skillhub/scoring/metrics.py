"""Continual-learning metrics of an accuracy matrix, each with its definition.

``R[k][j]`` is the score on task j after the k-th task was learned (k, j = 0..T-1, tasks in
the order they were learned); ``b[j]`` is the base model's score on task j.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFINITIONS = {
    "ACC": "average final score: (1/T) sum_j R[T-1][j] (Lopez-Paz & Ranzato 2017)",
    "BWT": "backward transfer: (1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j]); negative = forgetting "
           "(Lopez-Paz & Ranzato 2017)",
    "FWT": "forward transfer: (1/(T-1)) sum_{j>0} (R[j-1][j] - b[j]), the score on a task just before it is "
           "learned, against the base model (Lopez-Paz & Ranzato 2017)",
    "forgetting": "average forgetting: (1/(T-1)) sum_{j<T-1} max_{l<T-1} (R[l][j] - R[T-1][j]), the drop from "
                  "the best score ever reached (Chaudhry et al. 2018)",
}


def _check(matrix: Sequence[Sequence[float]], base: Sequence[float]) -> int:
    tasks = len(matrix)
    if tasks == 0 or any(len(row) != tasks for row in matrix) or len(base) != tasks:
        raise ValueError("R must be a square T x T matrix and b must hold T scores")
    return tasks


def continual_metrics(matrix: Sequence[Sequence[float]], base: Sequence[float]) -> dict[str, float | None]:
    """ACC, BWT, FWT and average forgetting of ``matrix`` (see DEFINITIONS).

    BWT, FWT and forgetting need at least two tasks; with one they are None.
    """
    tasks = _check(matrix, base)
    final = matrix[-1]
    result: dict[str, float | None] = {"ACC": sum(final) / tasks, "BWT": None, "FWT": None, "forgetting": None}
    if tasks > 1:
        earlier = range(tasks - 1)
        result["BWT"] = sum(final[j] - matrix[j][j] for j in earlier) / (tasks - 1)
        result["FWT"] = sum(matrix[j - 1][j] - base[j] for j in range(1, tasks)) / (tasks - 1)
        result["forgetting"] = sum(
            max(matrix[step][j] for step in range(tasks - 1)) - final[j] for j in earlier
        ) / (tasks - 1)
    return result
