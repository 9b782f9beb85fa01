"""The hybrid classifier (federated encoder + hybrid head) as an MLflow model from code.

``register`` logs this file with ``mlflow.pyfunc.log_model(python_model=<this file>)`` when
the hybrid head is the chosen variant, so nothing is pickled: the weights travel as
safetensors artifacts (``encoder``: the federated classifier's folder, ``head``: the quantum
stage's folder) and this code rebuilds the model from them. Input: images ``(n, c, h, w)``
float32 (``c`` as the encoder was trained); output: ``label`` ``(n,)``, ``probabilities`` and
``logits`` ``(n, num_classes)``, as the ONNX variants answer; the circuit runs on the torch
statevector backend on the CPU.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


def hybrid_logits(encoder, head, images: np.ndarray) -> np.ndarray:
    """Logits of images ``(n, c, h, w)`` (or grayscale ``(n, h, w)``) through the encoder and
    the head."""
    from pipelines.models.probes import extract_features
    from pipelines.quantum.hybrid import predict_logits

    return predict_logits(head, extract_features(encoder, images))


def labelled_outputs(logits: np.ndarray) -> dict[str, np.ndarray]:
    """What a served classifier answers: argmax labels, softmax probabilities and logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return {
        "label": logits.argmax(1).astype(np.int64),
        "probabilities": (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32),
        "logits": logits.astype(np.float32),
    }


class HybridClassifierModel(PythonModel):
    """MLflow pyfunc: images → encoder features → hybrid head → logits."""

    def load_context(self, context) -> None:
        """Rebuild the encoder and the hybrid head from their safetensors artifacts."""
        from pipelines.models.encoder import load_classifier
        from pipelines.quantum.hybrid import load_head

        self.encoder = load_classifier(context.artifacts["encoder"]).encoder.eval()
        self.head = load_head(context.artifacts["head"], "hybrid")

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads type hints
        """``{"label", "probabilities", "logits"}`` of images ``(n, c, h, w)``."""
        return labelled_outputs(hybrid_logits(self.encoder, self.head, np.asarray(model_input)))


mlflow.models.set_model(HybridClassifierModel())
