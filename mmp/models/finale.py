"""The end of `mmp demo`: leaderboard, promotion of the best run, one served prediction."""

from __future__ import annotations

from typing import Any

from mmp import config
from mmp.models.compare import leaderboard, table
from mmp.models.promote import promote
from mmp.models.serve import ModelServer

DEMO_METRIC = "val_accuracy"


def sample_digit(index: int = -1) -> tuple[Any, int]:
    """One 8×8 digit as the example train.py sees it: shape (1, 1, 8, 8), float32 in [0, 1]."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images[index] * (255.0 / 16.0)) / 255.0  # the IDX bytes, scaled as train.py does
    return pixels.astype(np.float32).reshape(1, 1, 8, 8), int(digits.target[index])


def demo_finale(experiment_name: str, console: Any, *, metric: str = DEMO_METRIC, mode: str = "max") -> dict:
    """Print the leaderboard on `console` (a rich Console), promote the best run, serve it and print
    one prediction."""
    from rich.markup import escape

    board = leaderboard(experiment_name, metric, mode=mode)
    console.print(table(board, max_rows=20))
    promotion = promote(experiment_name, metric, mode=mode, deployer=None)  # the local demo deploys nothing
    console.print(f"[green]✓[/] {escape(promotion.summary())}")
    image, label = sample_digit()
    ref = f"{promotion.model_name}@{promotion.alias}"
    console.print(f"starting the scoring server for {ref} (mlflow models serve) …", markup=False)
    with ModelServer(ref, log_path=str(config.mmp_home() / "serve.log")) as server:
        scores = server.predict(image)
        url = server.url
    row = scores[0] if scores and isinstance(scores[0], list) else scores
    predicted = max(range(len(row)), key=row.__getitem__)
    console.print(f"[green]✓[/] {url}/invocations answered: a handwritten {label} is predicted as "
                  f"[bold]{predicted}[/] ({'right' if predicted == label else 'wrong'}); server stopped")
    return {"leaderboard": board, "promotion": promotion, "url": url, "label": label, "predicted": predicted,
            "scores": row}
