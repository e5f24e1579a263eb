"""Rows from local files -> tokenized samples with labels only on the response.

    rows (JSON / JSONL / CSV / Parquet / datasets folder / hub dataset via datasets.load_dataset)
      -> segments [(text, trained?)]       by the dataset's type (custom mapping, alpaca,
                                           chat_template, completion)
      -> Sample(input_ids, labels)         labels = -100 on prompt tokens, the token id on
                                           response tokens and on the EOS that ends them
      -> truncated to sequence_len         counted and reported, never silent

Every error names the file, the row and the field, so a bad row is found without a debugger.
Batching and packing live in trainer/packing.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from lorad.files import sha256_file
from lorad.trainer.config import DatasetConfig, PromptFormat, TrainConfig
from lorad.trainer.errors import DataError

IGNORE = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA = PromptFormat(
    field_instruction="instruction",
    field_input="input",
    field_output="output",
    format=ALPACA_WITH_INPUT,
    no_input_format=ALPACA_NO_INPUT,
)


@dataclass
class Sample:
    input_ids: list[int]  # [n]
    labels: list[int]  # [n]; IGNORE where no loss, else == input_ids (unshifted, HF convention)
    source: str = ""  # "file:row" for messages

    @property
    def num_targets(self) -> int:
        """Tokens that receive a loss once shifted: every labelled token but a labelled first one."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class DataReport:
    rows: int = 0
    train_samples: int = 0
    eval_samples: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    sequence_len: int = 0
    train_tokens: int = 0
    target_tokens: int = 0
    file_digests: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"data: {self.rows} rows -> {self.train_samples} train / {self.eval_samples} eval samples, "
            f"{self.train_tokens} train tokens of which {self.target_tokens} are trained (response + EOS)"
        ]
        if self.truncated:
            out.append(
                f"data: {self.truncated} of {self.rows} samples were longer than sequence_len={self.sequence_len} "
                "and were truncated (their ends, EOS included, get no loss)"
            )
        if self.dropped_empty:
            out.append(
                f"data: {self.dropped_empty} samples had no response token left after truncation and were dropped"
            )
        return out


@dataclass
class PreparedData:
    train: list[Sample]
    eval: list[Sample]
    report: DataReport
    digest: str  # sha256 over the tokenized train and eval samples, in order


# --------------------------------------------------------------------------------------------
# Reading rows


def _read_jsonl(path: Path) -> list[tuple[dict, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            rows.append((row, f"{path}:{lineno}"))
    return rows


def _read_json(path: Path) -> list[tuple[dict, str]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json
            return _read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of rows (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return [(row, f"{path}[{i}]") for i, row in enumerate(data)]


def _read_csv(path: Path) -> list[tuple[dict, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        # DictReader numbers physical lines; row i of the data is on line reader.line_num
        return [(dict(row), f"{path}:{reader.line_num}") for row in reader]


def _read_parquet(path: Path) -> list[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    return [(row, f"{path}[{i}]") for i, row in enumerate(table.to_pylist())]


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _rows_of_dataset(loaded, where: str, ds: DatasetConfig) -> list[tuple[dict, str]]:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if ds.split not in loaded:
            raise DataError(f"{where}: has splits {', '.join(loaded)}, not {ds.split!r}; set split: in the dataset entry")
        loaded = loaded[ds.split]
    return [(row, f"{where}[{i}]") for i, row in enumerate(loaded.to_list())]


def _read_saved_dataset(path: Path, ds: DatasetConfig) -> list[tuple[dict, str]]:
    import datasets

    return _rows_of_dataset(datasets.load_from_disk(str(path)), str(path), ds)


def _folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def local_copy_hint(ds: DatasetConfig) -> str:
    return (
        "Point path at a local copy: where the hub is reachable, run "
        f"`huggingface-cli download --repo-type dataset {ds.path} --local-dir DIR` "
        f"(or `datasets.load_dataset({ds.path!r}).save_to_disk('DIR')`), bring DIR here and set "
        "`path: DIR` in the dataset entry (or `--set datasets.N.path=DIR`); a .json, .jsonl, .csv or .parquet "
        "file works too"
    )


def _load_dataset(ds: DatasetConfig, source: str, *, local: bool) -> list[tuple[dict, str]]:
    """datasets.load_dataset with axolotl's keys: a hub id, or a local copy of a dataset repository."""
    import datasets

    kwargs = {"name": ds.name, "split": ds.split, "data_files": ds.data_files, "revision": ds.revision}
    try:
        loaded = datasets.load_dataset(source, **{k: v for k, v in kwargs.items() if v is not None})
    except ValueError as exc:  # a wrong split / name: datasets names the choices
        raise DataError(f"dataset {ds.path!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (ConnectionError, FileNotFoundError, ...)
        if local:
            raise DataError(
                f"{source}: a folder, but neither one written by datasets' save_to_disk (no dataset_info.json / "
                "dataset_dict.json) nor a dataset repository datasets can read (data files such as data/*.parquet, "
                f"*.jsonl or *.csv): {exc}. Point path at a .json, .jsonl, .csv or .parquet file instead"
            ) from exc
        reason = f"{type(exc).__name__}: {exc}"
        raise DataError(
            f"dataset path {ds.path!r} is not a local file or folder, so lorad read it as a hub dataset, and datasets "
            f"could not fetch it ({reason}). " + local_copy_hint(ds)
        ) from exc
    where = f"{ds.path}" + (f"[{ds.name}]" if ds.name else "")
    return _rows_of_dataset(loaded, where, ds)


READERS = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}


def read_rows(ds: DatasetConfig) -> tuple[list[tuple[dict, str]], str]:
    """All rows of one dataset entry with their "file:row" locations, and a sha256 of the source.

    A local file goes through lorad's readers (errors name the line); a local folder is a
    save_to_disk folder or a copy of a dataset repository; anything else is a hub dataset."""
    path = Path(ds.path).expanduser()
    if not path.exists():
        rows = _load_dataset(ds, ds.path, local=False)
        h = hashlib.sha256(json.dumps([ds.path, ds.name, ds.split, ds.data_files, ds.revision]).encode())
        for row, _ in rows:
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest = h.hexdigest()  # over the rows read: a hub dataset has no one file to hash
    elif path.is_dir() or ds.ds_type == "arrow":
        rows = _read_saved_dataset(path, ds) if _is_saved_dataset(path) else _load_dataset(ds, str(path), local=True)
        digest = _folder_digest(path)
    else:
        kind = ds.ds_type or path.suffix.lower().lstrip(".")
        reader = READERS.get(kind)
        if reader is None:
            raise DataError(
                f"dataset {ds.path!r}: unknown file type {path.suffix!r}; use .json, .jsonl, .csv or .parquet "
                "(or set ds_type: json|csv|parquet)"
            )
        if kind == "json" and path.suffix.lower() == ".jsonl":
            reader = _read_jsonl
        rows = reader(path)
        digest = sha256_file(path)
    if not rows:
        raise DataError(f"dataset {ds.path!r} has no rows")
    for row, where in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object with named fields, got {type(row).__name__}")
    return rows, digest


@dataclass
class RawDataset:
    config: DatasetConfig
    rows: list[tuple[dict, str]]  # (row, "file:row")
    digest: str  # sha256 of the source


def read_datasets(cfg: TrainConfig) -> list[RawDataset]:
    """Every dataset entry's rows, read before any model is loaded so a missing dataset fails fast."""
    return [RawDataset(ds, *read_rows(ds)) for ds in cfg.datasets]


# --------------------------------------------------------------------------------------------
# Rows -> text segments


def _text_field(row: dict, name: str, where: str, *, required: bool = True) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(f"{where}: field {name!r} is missing or null (fields present: {present})")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return str(value)


def detect_type(row: dict, ds: DatasetConfig, where: str) -> str | PromptFormat:
    if ds.field_messages in row:
        return "chat_template"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if ds.field in row:
        return "completion"
    raise DataError(
        f"{where}: cannot tell the dataset type from fields {', '.join(sorted(map(str, row)))}; set type: in the "
        "dataset entry (alpaca, chat_template, completion, or a mapping with field_instruction/field_output)"
    )


def format_segments(row: dict, fmt: PromptFormat, where: str) -> list[tuple[str, bool]]:
    """The custom mapping (and alpaca, which is one): [(prompt, False), (response, True)]."""
    instruction = _text_field(row, fmt.field_instruction, where)
    response = _text_field(row, fmt.field_output, where)
    given = _text_field(row, fmt.field_input, where, required=False) if fmt.field_input else None
    system = _text_field(row, fmt.field_system, where, required=False) if fmt.field_system else None
    system = system if system else fmt.system_prompt
    prompt = fmt.system_format.format(system=system) if system else ""
    if given:
        prompt += fmt.format.format(instruction=instruction, input=given)
    else:
        prompt += fmt.no_input_format.format(instruction=instruction)
    return [(prompt, False), (response, True)]


def _check_messages(messages, field_name: str, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field_name!r} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field_name}[{i}] must be an object with string 'role' and 'content', got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: {field_name} has no assistant message, so nothing would be trained")
    return messages


def chat_segments(row: dict, ds: DatasetConfig, tokenizer, where: str) -> list[tuple[str, bool]]:
    """Render with the tokenizer's chat template; every assistant turn is trained, up to and
    including the end-of-turn token (the text the template emits after the turn's content is
    trained only up to the EOS token string)."""
    messages = _check_messages(row.get(ds.field_messages), ds.field_messages, where)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat data needs a tokenizer with a chat template; this base has none")

    def render(msgs, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""
    eos = tokenizer.eos_token or ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else render([], True)
        after = render(messages[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise DataError(
                f"{where}: the chat template does not render conversations as growing prefixes, so the "
                "assistant turns cannot be located; use a custom type mapping instead"
            )
        turn = after[len(before):]
        cut = turn.find(eos) + len(eos) if eos and eos in turn else len(turn)
        segments += [(before[len(done):], False), (turn[:cut], True), (turn[cut:], False)]
        done = after
    full = render(messages, False)
    if full.startswith(done) and len(full) > len(done):
        segments.append((full[len(done):], False))
    return [(text, train) for text, train in segments if text]


# --------------------------------------------------------------------------------------------
# Segments -> tokens


class Tokenize:
    """Tokenizes segments one by one so the label boundary is exact.

    The tokenizer's own leading special tokens (a BOS, when it adds one) go in front of the
    first segment; the EOS id is appended to a trailing trained segment that does not already
    end with it, so the model learns to stop."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        with_special = tokenizer("a")["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix = with_special[: len(with_special) - len(without)] if with_special[-len(without):] == without else []
        if tokenizer.eos_token_id is None:
            raise DataError("the base's tokenizer has no EOS token, so a trained response could never stop")
        self.eos_id = tokenizer.eos_token_id

    def __call__(self, segments: list[tuple[str, bool]], *, append_eos: bool, train_on_inputs: bool) -> Sample:
        ids: list[int] = list(self.prefix)
        labels: list[int] = [IGNORE] * len(ids)
        for text, train in segments:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if (train or train_on_inputs) else [IGNORE] * len(piece)
        if append_eos and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
            labels.append(self.eos_id)
        elif append_eos:
            labels[-1] = self.eos_id
        return Sample(ids, labels)


def tokenize_row(row: dict, where: str, ds: DatasetConfig, tok: Tokenize, train_on_inputs: bool) -> Sample:
    kind = ds.type if ds.type is not None else detect_type(row, ds, where)
    if kind == "chat_template":
        sample = tok(chat_segments(row, ds, tok.tokenizer, where), append_eos=False, train_on_inputs=train_on_inputs)
    elif kind == "completion":
        text = _text_field(row, ds.field, where)
        sample = tok([(text, True)], append_eos=True, train_on_inputs=True)
    else:
        fmt = ALPACA if kind == "alpaca" else kind
        sample = tok(format_segments(row, fmt, where), append_eos=True, train_on_inputs=train_on_inputs)
    sample.source = where
    return sample


def _split_sizes(n: int, val_set_size: float) -> int:
    if val_set_size <= 0:
        return 0
    n_eval = int(val_set_size) if val_set_size >= 1 else max(1, round(n * val_set_size))
    if n_eval >= n:
        raise DataError(f"val_set_size: {val_set_size} leaves no training rows out of {n}")
    return n_eval


def prepare_data(cfg: TrainConfig, tokenizer, raw: list[RawDataset] | None = None) -> PreparedData:
    """Tokenize, truncate and split every dataset of the config (read here unless `raw` is given)."""
    tok = Tokenize(tokenizer)
    report = DataReport(sequence_len=cfg.sequence_len)
    samples: list[Sample] = []
    for entry in raw if raw is not None else read_datasets(cfg):
        ds, rows = entry.config, entry.rows
        report.file_digests[ds.path] = entry.digest
        report.rows += len(rows)
        for row, where in rows:
            sample = tokenize_row(row, where, ds, tok, cfg.train_on_inputs)
            if len(sample.input_ids) > cfg.sequence_len:
                report.truncated += 1
                sample.input_ids = sample.input_ids[: cfg.sequence_len]
                sample.labels = sample.labels[: cfg.sequence_len]
            if sample.num_targets == 0:
                report.dropped_empty += 1
                continue
            samples.append(sample)
    if not samples:
        raise DataError("no sample has a response token to train on (see the truncation report above)")

    n_eval = _split_sizes(len(samples), cfg.val_set_size)
    order = list(range(len(samples)))
    random.Random(cfg.seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [s for i, s in enumerate(samples) if i not in eval_idx]
    evals = [s for i, s in enumerate(samples) if i in eval_idx]
    report.train_samples, report.eval_samples = len(train), len(evals)
    report.train_tokens = sum(len(s.input_ids) for s in train)
    report.target_tokens = sum(s.num_targets for s in train)

    h = hashlib.sha256()
    for part, items in (("train", train), ("eval", evals)):
        h.update(part.encode())
        for s in items:
            h.update(json.dumps([s.input_ids, s.labels]).encode())
    return PreparedData(train=train, eval=evals, report=report, digest=h.hexdigest())
