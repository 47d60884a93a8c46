"""Classification accuracy and cross-entropy of ``digit_prediction/1`` samples: HSTN's cluttered-MNIST comparison
(Shu et al., section 4.1, Table 1: accuracy and cross-entropy on held-out digits).

Per sample: the predicted label (argmax of the stored probabilities), correct or not, the probability given to
the true label and its cross-entropy ``-log p_true`` (probabilities clipped at 1e-12 so a confident mistake costs
27.6 nats, not infinity). Headline ``accuracy`` (higher is better); also ``cross_entropy`` (mean), per-class
accuracy, a confusion-matrix figure and the per-sample rows.
"""

from __future__ import annotations

import numpy as np

from maskflow.data import schema
from maskflow.evaluate import EvalResult, Evaluator

__all__ = ["ClassificationAccuracy", "confusion_matrix", "MIN_PROBABILITY"]

MIN_PROBABILITY = 1e-12


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: row = true label, column = predicted label."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, num_classes)


class ClassificationAccuracy(Evaluator):
    name = "classification"
    metric = "accuracy"
    higher_is_better = True
    schema = schema.DIGIT_PREDICTION_SCHEMA.name

    def __init__(self):
        self.reset()

    def predicted_by(self, sample: dict) -> str | None:
        return schema.decode_value(sample[schema.PREDICTION], "json").get("model")

    def reset(self) -> None:
        self.rows: list[dict] = []
        self.num_classes = 0

    def process(self, samples: list[dict]) -> None:
        for sample in samples:
            meta = schema.decode_value(sample[schema.META], "json")
            prediction = schema.decode_value(sample[schema.PREDICTION], "json")
            probabilities = np.asarray(prediction["probabilities"], dtype=np.float64)
            label = int(meta["label"])
            if not 0 <= label < len(probabilities):
                raise ValueError(f"sample {sample['__key__']}: label {label} outside the {len(probabilities)} "
                                 "predicted classes")
            self.num_classes = max(self.num_classes, len(probabilities))
            predicted = int(prediction.get("label", int(probabilities.argmax())))
            p_true = float(probabilities[label])
            self.rows.append({
                "key": sample["__key__"], "sample_id": meta.get("sample_id"), "split": meta.get("split", ""),
                "label": label, "predicted": predicted, "correct": int(predicted == label),
                "p_true": p_true, "cross_entropy": float(-np.log(max(p_true, MIN_PROBABILITY))),
            })

    def summarize(self) -> EvalResult:
        n = len(self.rows)
        if n == 0:
            return EvalResult(metrics={"accuracy": float("nan"), "cross_entropy": float("nan"), "samples": 0.0},
                              rows=[], figures={}, text={})
        labels = np.array([r["label"] for r in self.rows], dtype=np.int64)
        predicted = np.array([r["predicted"] for r in self.rows], dtype=np.int64)
        confusion = confusion_matrix(labels, predicted, self.num_classes)
        per_class = np.diag(confusion) / np.maximum(confusion.sum(1), 1)
        metrics = {
            "accuracy": float(np.mean([r["correct"] for r in self.rows])),
            "cross_entropy": float(np.mean([r["cross_entropy"] for r in self.rows])),
            "samples": float(n),
            **{f"accuracy_class_{k}": float(per_class[k]) for k in range(self.num_classes) if confusion[k].sum()},
        }
        text = {"summary.md": f"accuracy {metrics['accuracy']:.4f}, cross-entropy {metrics['cross_entropy']:.4f} "
                              f"over {n} samples\n",
                "confusion_matrix.csv": "\n".join(",".join(map(str, row)) for row in confusion) + "\n"}
        return EvalResult(metrics=metrics, rows=list(self.rows),
                          figures={"confusion_matrix.png": confusion_figure(confusion, metrics["accuracy"])},
                          text=text)


def confusion_figure(confusion: np.ndarray, accuracy: float):
    """The confusion matrix as a heat map with counts (rows: true label, columns: predicted)."""
    from matplotlib.figure import Figure

    k = confusion.shape[0]
    fig = Figure(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(confusion, cmap="Blues")
    top = confusion.max() or 1
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > top / 2 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (accuracy {accuracy:.4f})")
    fig.colorbar(shown, ax=ax, shrink=0.8)
    return fig
