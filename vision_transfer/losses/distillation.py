"""Knowledge distillation (Hinton et al. 2015): a trained teacher's softened outputs as extra targets, and
optionally its features' similarity structure (Tung & Mori 2019).

The teacher is any classifier this toolkit loads (a checkpoint, ``probe.ckpt`` or an export folder; any
backbone, its own preprocessing). It sees the student's training view (after augmentation and mixing): the
view is taken back to pixels with the student's normalisation, resized to the teacher's input size and
normalised with the teacher's. It runs in eval mode without gradients and is never part of the student's
state (its path is recorded in the student's hyperparameters, nothing more).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vision_transfer.errors import ConfigError


def softmax_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch: the ``T^2`` keeps
    the gradients' size as T changes."""
    s, t = student.float() / temperature, teacher.float() / temperature
    return temperature**2 * F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean",
                                     log_target=True)  # fmt: skip


def sigmoid_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-label: ``T^2 *`` the binary cross-entropy of ``sigmoid(student / T)`` against
    ``sigmoid(teacher / T)``, averaged over samples and classes."""
    s, t = student.float() / temperature, teacher.float() / temperature
    return temperature**2 * F.binary_cross_entropy_with_logits(s, torch.sigmoid(t))


def similarity_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Feature distillation by similarity preservation (Tung & Mori 2019): the batch's ``b x b`` Gram matrix of
    each model's pooled features, rows L2-normalised, compared by ``||G_s - G_t||_F^2 / b^2``. The student
    learns which images the teacher finds alike, whatever either feature size (no projection to train)."""

    def gram(features: torch.Tensor) -> torch.Tensor:
        flat = features.float().flatten(1)
        return F.normalize(flat @ flat.T, dim=1)

    return (gram(student) - gram(teacher)).pow(2).sum() / len(student) ** 2


class Teacher:
    """A frozen classifier giving logits for the student's normalised views (not an ``nn.Module`` attribute
    of the student, so it never enters its checkpoint or its optimizer)."""

    def __init__(self, path: str | Path, class_names: list[str], kind: Any) -> None:
        from vision_transfer.export.loading import load_classifier

        self.path = str(path)
        try:
            classifier = load_classifier(path)
        except Exception as e:  # the loader's own message names the file
            raise ConfigError(f"teacher={self.path!r}: {e}") from e
        if list(classifier.class_names) != list(class_names):
            raise ConfigError(
                f"teacher={self.path!r} has classes {_short(classifier.class_names)}, the student "
                f"{_short(class_names)}: distillation needs the same classes in the same order."
            )
        if classifier.kind.name != kind.name:
            raise ConfigError(f"teacher={self.path!r} is {classifier.kind.name}, the student {kind.name}.")
        self.model: nn.Module = classifier.eval().requires_grad_(False)
        self.data_config = classifier.data_config
        self.mean = torch.tensor(self.data_config.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(self.data_config.std).view(1, 3, 1, 1)
        self.interpolation = "bicubic" if self.data_config.interpolation == "bicubic" else "bilinear"

    def to(self, device: torch.device) -> Teacher:
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def logits(self, views: torch.Tensor, student_mean: torch.Tensor, student_std: torch.Tensor) -> torch.Tensor:
        """Teacher logits of student-normalised views; ``student_mean``/``std``: per channel, in [0, 1] units."""
        return self.outputs(views, student_mean, student_std)[1]

    @torch.no_grad()
    def outputs(
        self, views: torch.Tensor, student_mean: torch.Tensor, student_std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's pooled features and logits of student-normalised views (see :meth:`logits`)."""
        pixels = views.float() * student_std.view(1, 3, 1, 1) + student_mean.view(1, 3, 1, 1)  # [0, 1]
        _, height, width = self.data_config.input_size
        if pixels.shape[-2:] != (height, width):
            pixels = F.interpolate(pixels, size=(height, width), mode=self.interpolation, antialias=True,
                                   align_corners=False).clamp(0, 1)  # fmt: skip
        features = self.model.backbone((pixels - self.mean) / self.std)  # type: ignore[operator]
        return features.float(), self.model.head(features).float()  # type: ignore[operator]

    def describe(self) -> str:
        _, height, width = self.data_config.input_size
        return f"teacher {Path(self.path).name} ({self.model.architecture}, {height}x{width})"  # type: ignore[union-attr]


def _short(names: Any) -> str:
    names = list(names)
    return ", ".join(names[:5]) + (f", ... ({len(names)})" if len(names) > 5 else "")


class TeacherMemo:
    """The teacher's outputs of fixed training views, computed at a view's first sight and reused after it
    (``kd_cache``).

    A view is keyed by its pixels (a BLAKE2b digest of its uint8 values, recovered from the student's
    normalised view by rounding), so the loader's order, the sampler and the DDP rank do not matter and one
    image never reads another's outputs. Logits and pooled features (with feature distillation) are kept as
    the teacher gave them, in float32, on the CPU (float16 features changed the student's weights measurably).
    :meth:`save` and :meth:`load` keep them in one safetensors file between runs (other seeds, a resume).

    Args:
        features: keep the teacher's pooled features too.
        limit: at most this many views are new in a run (the training split's size): more means the views
            are not fixed (augmentation) and nothing could be reused, which is refused.
    """

    def __init__(self, features: bool, limit: int | None = None) -> None:
        self.features = features
        self.limit = limit
        self.rows: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.added: list[bytes] = []  # new since the last sync
        self.new_in_run = 0
        self.hits = self.misses = 0

    @staticmethod
    def keys(views: torch.Tensor, student_mean: torch.Tensor, student_std: torch.Tensor) -> list[bytes]:
        """One digest per view of student-normalised ``views`` (``student_mean``/``std`` in [0, 1] units)."""
        import hashlib

        unit = views.detach().float() * student_std.view(1, 3, 1, 1) + student_mean.view(1, 3, 1, 1)
        pixels = (unit * 255).round().clamp(0, 255).to(torch.uint8).cpu().contiguous().numpy()
        return [hashlib.blake2b(pixel.tobytes(), digest_size=16).digest() for pixel in pixels]

    def outputs(
        self, teacher: Teacher, views: torch.Tensor, student_mean: torch.Tensor, student_std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`Teacher.outputs` of ``views``, the teacher running on the views not seen before only.
        Without ``features`` the first element is an empty tensor."""
        keys = self.keys(views, student_mean, student_std)
        new = [i for i, key in enumerate(keys) if key not in self.rows]
        self.hits += len(keys) - len(new)
        self.misses += len(new)
        if new:
            index = torch.tensor(new, device=views.device)
            features, logits = teacher.outputs(views.index_select(0, index), student_mean, student_std)
            kept_features = features.float().cpu() if self.features else None
            logits_cpu = logits.float().cpu()
            for j, i in enumerate(new):
                if keys[i] not in self.rows:  # an image twice in one batch is added once
                    self.rows[keys[i]] = (logits_cpu[j], kept_features[j] if kept_features is not None else None)
                    self.added.append(keys[i])
                    self.new_in_run += 1
            if self.limit is not None and self.new_in_run > self.limit:
                raise ConfigError(
                    f"kd_cache: {self.new_in_run} different training views in this run, more than the "
                    f"{self.limit} training images: the views change between epochs (augmentation, mixing), so "
                    "no teacher output is ever reused; drop kd_cache or train on fixed views (augment: none)."
                )
        rows = [self.rows[key] for key in keys]
        logits = torch.stack([row[0] for row in rows]).to(views.device)
        if not self.features:
            return logits.new_empty(0), logits
        return torch.stack([row[1] for row in rows]).to(views.device), logits  # type: ignore[misc]

    def take_added(self) -> dict[bytes, tuple[torch.Tensor, torch.Tensor | None]]:
        """The entries added since the last call (to share across DDP ranks and to save)."""
        added = {key: self.rows[key] for key in self.added}
        self.added = []
        return added

    def merge(self, entries: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Entries another rank computed (not counted as new in this run)."""
        for key, value in entries.items():
            self.rows.setdefault(key, value)

    def save(self, path: Path) -> None:
        """All entries as one safetensors file, written atomically."""
        from safetensors.torch import save

        from vision_transfer.files import write_atomic

        keys = list(self.rows)
        tensors = {
            "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), -1),
            "logits": torch.stack([self.rows[k][0] for k in keys]),
        }
        if self.features:
            tensors["features"] = torch.stack([self.rows[k][1] for k in keys])  # type: ignore[misc]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, save(tensors), "teacher outputs", advice="rerun: the teacher's outputs are computed again")

    def load(self, path: Path) -> int:
        """Entries of a file :meth:`save` wrote (an unreadable one is ignored: the teacher runs again); how many."""
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except Exception:
            return 0
        if self.features and "features" not in tensors:
            return 0
        keys = [bytes(row) for row in tensors["keys"].numpy()]
        for i, key in enumerate(keys):
            self.rows.setdefault(key, (tensors["logits"][i], tensors["features"][i] if self.features else None))
        return len(keys)
