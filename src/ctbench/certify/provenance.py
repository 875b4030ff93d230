"""What a verdict is a verdict *of*: the model, the radius, the data and the verifier settings.

Every record the cascade writes carries a ``Provenance``: the content hash of the model's
parameters and buffers, eps, the data set and split (name and a content hash of its images
and labels), a hash of the verdict-relevant stage settings, and the ctbench version. Resuming a
verdicts file and merging shard files compare it field by field and refuse any difference
(``ProvenanceMismatch`` names the field and both values), so verdicts of two networks, two
radii or two verifier configurations are never mixed. The full settings behind the hash are
written to ``provenance.json`` in the verdicts folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

# Settings that change how verdicts are reported or scheduled but never what they are.
_SETTINGS_NOT_HASHED = ("batch_size", "cross_check", "inline_counterexample_limit")


class ProvenanceMismatch(ValueError):
    """Verdicts of different models, radii, data, settings or versions would be mixed."""


def package_version() -> str:
    from .. import __version__

    return __version__


def _update_with_tensor(digest, name: str, tensor: Tensor) -> None:
    shape = tuple(tensor.shape)
    tensor = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
    digest.update(f"{name}:{tensor.dtype}:{shape};".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def model_hash(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the model's state: every parameter and buffer by name, with
    its dtype, shape and bytes. Independent of the file it was loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _update_with_tensor(digest, name, tensor)
    return digest.hexdigest()[:16]


def data_hash(images: Tensor, labels: Tensor) -> str:
    """sha256 (16 hex digits) of a split's images and labels."""
    digest = hashlib.sha256()
    _update_with_tensor(digest, "images", images)
    _update_with_tensor(digest, "labels", labels)
    return digest.hexdigest()[:16]


def settings_record(settings) -> dict[str, Any]:
    """The verdict-relevant part of ``CertifySettings`` as plain JSON data."""
    record = dataclasses.asdict(settings)
    for key in _SETTINGS_NOT_HASHED:
        record.pop(key, None)
    return json.loads(json.dumps(record, default=str))


def settings_hash(settings) -> str:
    text = json.dumps(settings_record(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Provenance:
    """model: ``model_hash``; eps: the radius; data: "<name>/<split>@<data_hash>";
    settings: ``settings_hash``; version: the ctbench version that wrote the record."""

    model: str
    eps: float
    data: str
    settings: str
    version: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "Provenance":
        fields = {field.name for field in dataclasses.fields(Provenance)}
        if not isinstance(data, Mapping) or set(data) != fields:
            raise ValueError(f"a provenance record needs exactly the keys {sorted(fields)}, got {data!r}")
        return Provenance(**data)

    def differences(self, other: "Provenance") -> list[str]:
        """One line per differing field: "eps: 0.1 here, 0.3 there"."""
        lines = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            same = (math.isclose(mine, theirs, rel_tol=1e-12, abs_tol=0.0) if field.name == "eps"
                    else mine == theirs)
            if not same:
                lines.append(f"{field.name}: {mine!r} here, {theirs!r} there")
        return lines


def check_same(expected: Provenance | None, found: Provenance | None, where: str, fix: str) -> None:
    """Raise ``ProvenanceMismatch`` unless ``found`` equals ``expected`` (both known)."""
    if found is None or expected is None:
        raise ProvenanceMismatch(f"{where} holds verdicts without provenance (written by an older ctbench): "
                                 f"their model, eps and settings cannot be checked; {fix}")
    differences = expected.differences(found)
    if differences:
        raise ProvenanceMismatch(f"{where} holds verdicts of another certification ({'; '.join(differences)}); "
                                 f"{fix}")
