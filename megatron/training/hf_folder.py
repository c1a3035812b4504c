"""Read a local Hugging Face model folder one tensor at a time.

:class:`HFFolder` reads ``config.json`` (and ``generation_config.json``), lists the folder's tensors with their
shapes and dtypes without loading them, and hands out one tensor at a time, so that converting an 8B model never
holds the whole source in memory. Weights may be

* ``model.safetensors``, or several ``*.safetensors`` shards with or without ``model.safetensors.index.json``
  (read with ``safetensors.safe_open``: only the asked-for tensor is read);
* ``pytorch_model.bin``, or shards listed in ``pytorch_model.bin.index.json`` (read with
  ``torch.load(..., weights_only=True, mmap=True)``: the file is memory-mapped, not read).

An index names the tensors exactly (tensors in a shard but not in the index are ignored, as ``transformers`` does);
a tensor listed in the index but missing from its file is an error. The tokenizer files beside the weights can be
copied elsewhere with :meth:`HFFolder.copy_tokenizer`. Problems raise :class:`HFFolderError` with a one-line message.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["TOKENIZER_FILES", "HFFolder", "HFFolderError", "TensorInfo"]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# The files of a Hugging Face tokenizer (the generation config travels with them: it names the stop tokens).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   GENERATION_CONFIG_FILE)
# Files that make a folder a usable tokenizer on their own (the others only configure one).
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


class HFFolderError(ValueError):
    """A Hugging Face folder that cannot be read as asked (one-line message)."""


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: its name, shape, dtype and the file holding it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None for a dtype torch lacks
    file: Path

    def numel(self) -> int:
        """The number of elements."""
        count = 1
        for size in self.shape:
            count *= size
        return count


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise HFFolderError(f"cannot read the {what} {path}: {_first_line(error)}") from None


class HFFolder:
    """A local Hugging Face model folder: its config, its tensors (listed up front, read one at a time) and its
    tokenizer files. Use as a context manager (or call :meth:`close`) to release the open weight files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise HFFolderError(f"Hugging Face folder {self.path} does not exist")
        if not self.path.is_dir():
            raise HFFolderError(f"{self.path} is not a folder (give the Hugging Face model folder)")
        config_path = self.path / CONFIG_FILE
        if not config_path.is_file():
            raise HFFolderError(f"{self.path} has no {CONFIG_FILE}: not a Hugging Face model folder")
        self.config: dict[str, Any] = _read_json(config_path, "model config")
        if not isinstance(self.config, dict):
            raise HFFolderError(f"{config_path} does not hold a JSON object")
        generation = self.path / GENERATION_CONFIG_FILE
        self.generation_config: dict[str, Any] | None = None
        if generation.is_file():
            found = _read_json(generation, "generation config")
            self.generation_config = found if isinstance(found, dict) else None
        self._handles: dict[Path, Any] = {}  # open safetensors files
        self._bin_dicts: dict[Path, dict[str, torch.Tensor]] = {}  # memory-mapped pytorch_model*.bin state dicts
        self.weights_format, self.tensors = self._list_tensors()

    # ------------------------------------------------------------------------------------------------ listing

    def _list_tensors(self) -> tuple[str, dict[str, TensorInfo]]:
        if (self.path / SAFETENSORS_INDEX).is_file():
            return "safetensors (sharded, with index)", self._from_index(self.path / SAFETENSORS_INDEX, self._st_info)
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            tensors: dict[str, TensorInfo] = {}
            for shard in shards:
                for info in self._st_info(shard):
                    if info.name in tensors:
                        raise HFFolderError(f"tensor {info.name!r} is in both {tensors[info.name].file.name} and "
                                            f"{shard.name}")
                    tensors[info.name] = info
            return ("safetensors" if len(shards) == 1 else "safetensors (sharded, no index)"), tensors
        if (self.path / BIN_INDEX).is_file():
            return "pytorch_model.bin (sharded, with index)", self._from_index(self.path / BIN_INDEX, self._bin_info)
        if (self.path / BIN_SINGLE).is_file():
            return "pytorch_model.bin", {info.name: info for info in self._bin_info(self.path / BIN_SINGLE)}
        raise HFFolderError(f"{self.path} holds no weights: no *.safetensors, {SAFETENSORS_INDEX}, {BIN_SINGLE} or "
                            f"{BIN_INDEX}")

    def _from_index(self, index_path: Path, read: Any) -> dict[str, TensorInfo]:
        index = _read_json(index_path, "weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFFolderError(f"{index_path} has no 'weight_map' naming the tensors' files")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file:
                raise HFFolderError(f"{index_path}: tensor {name!r} names the file {file!r}, not a file in the folder")
            by_file.setdefault(file, []).append(name)
        found: dict[str, TensorInfo] = {}
        for file in by_file:
            shard = self.path / file
            if not shard.is_file():
                raise HFFolderError(f"{index_path} lists {file}, which is missing from {self.path}")
            found.update({info.name: info for info in read(shard)})
        tensors = {}
        for name, file in weight_map.items():
            info = found.get(name)
            if info is None or info.file.name != file:
                raise HFFolderError(f"tensor {name!r} is listed in {index_path.name} but missing from {file}")
            tensors[name] = info
        return tensors

    def _st_handle(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as error:  # safetensors raises its own error types for corrupt files
                raise HFFolderError(f"cannot read {file}: {_first_line(error)}") from None
            self._handles[file] = handle
        return handle

    def _st_info(self, file: Path) -> list[TensorInfo]:
        handle = self._st_handle(file)
        infos = []
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            piece = handle.get_slice(name)
            infos.append(TensorInfo(name, tuple(int(s) for s in piece.get_shape()),
                                    _SAFETENSORS_DTYPES.get(piece.get_dtype()), file))
        return infos

    def _bin_state(self, file: Path) -> dict[str, torch.Tensor]:
        state = self._bin_dicts.get(file)
        if state is None:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise HFFolderError(f"cannot read {file}: {_first_line(error)}") from None
                state = self._load_bin_unmapped(file)  # the legacy (pre-zip) format cannot be memory-mapped
            except Exception as error:  # pickle / zip errors of corrupt files
                raise HFFolderError(f"cannot read {file}: {_first_line(error)}") from None
            if not isinstance(state, dict):
                raise HFFolderError(f"{file} does not hold a state dict")
            bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)),
                       None)
            if bad is not None:
                raise HFFolderError(f"{file} holds a non-tensor entry {bad!r}")
            self._bin_dicts[file] = state
        return state

    @staticmethod
    def _load_bin_unmapped(file: Path) -> Any:
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle / zip errors of corrupt files
            raise HFFolderError(f"cannot read {file}: {_first_line(error)}") from None

    def _bin_info(self, file: Path) -> list[TensorInfo]:
        return [TensorInfo(name, tuple(tensor.shape), tensor.dtype, file)
                for name, tensor in self._bin_state(file).items()]

    # ------------------------------------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """The shape, dtype and file of tensor ``name`` (``HFFolderError`` if there is none)."""
        info = self.tensors.get(name)
        if info is None:
            raise HFFolderError(f"{self.path} has no tensor {name!r}")
        return info

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read from its file now (a fresh CPU tensor; nothing else is read)."""
        info = self.info(name)
        if info.file.suffix == ".safetensors":
            try:
                return self._st_handle(info.file).get_tensor(name)
            except Exception as error:  # safetensors raises its own error types for truncated files
                raise HFFolderError(f"cannot read tensor {name!r} from {info.file}: {_first_line(error)}") from None
        return self._bin_state(info.file)[name]

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for ``names`` (default: all), read one at a time."""
        for name in self.names() if names is None else names:
            yield name, self.get(name)

    def close(self) -> None:
        """Release the open weight files (later reads reopen them)."""
        self._handles.clear()
        self._bin_dicts.clear()

    def __enter__(self) -> HFFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- tokenizer

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files of the folder (and its ``generation_config.json``), in :data:`TOKENIZER_FILES`
        order."""
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def has_tokenizer(self) -> bool:
        """Whether the folder holds a tokenizer model (``tokenizer.json``, ``tokenizer.model`` or ``vocab.json``)."""
        return any((self.path / name).is_file() for name in TOKENIZER_MODEL_FILES)

    def copy_tokenizer(self, destination: str | Path) -> list[str]:
        """Copy the tokenizer files into ``destination`` (created); returns the names copied."""
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        copied = []
        for file in self.tokenizer_files():
            shutil.copy2(file, destination / file.name)
            copied.append(file.name)
        return copied

    def total_bytes(self) -> int:
        """The size of every listed tensor, in bytes."""
        return sum(info.numel() * (info.dtype.itemsize if info.dtype is not None else 0)
                   for info in self.tensors.values())
