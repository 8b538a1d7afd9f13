"""Label sources: where each image's age (or age group) comes from.

One small class per source behind one interface, `LabelSource`: rows(data_dir, edges) -> (list[LabelRow],
list[Skip]) says what the source says about each file, settings() what goes into the feature file's settings.
Adding a dataset format means adding one class (or one CSV preset): dataset.scan checks every row the same
way afterwards (a regular readable file with a UTF-8 name; the age or group fits the bins) and hashes it.
  UTKFaceNames   ages from UTKFace names `age_gender_race_datetime.jpg` (the default)
  CsvLabels      a CSV/TSV file: a `path` column and `age` (years) or `group` (an index or a range such as
                 26-50); optional gender, race, split, subject, x,y,w,h (face box) and eye-point columns
  ClassFolders   DATA/<label>/.../*.jpg where <label> is an age (34) or an age range (26-50)
The default source adds nothing to the settings, so UTKFace feature files made before label sources
existed keep their fingerprints."""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.constants import MAX_AGE, RACE_UNKNOWN, SPLIT_NAMES, group_names
from pipeline.files import file_sha256

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


AGE_UNKNOWN = -1       # stored age of a row whose source gives only its group


GENDER_UNKNOWN = -1


_NAME = re.compile(r"^(?P<age>\d+)_(?P<gender>\d+)_(?:(?P<race>\d+)_)?(?P<datetime>\d{8,})")


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str


@dataclass(frozen=True)
class LabelRow:
    """What a label source says about one file, before the file itself is checked."""
    path: str                      # relative to the data folder, POSIX separators
    age: int | None = None         # years; None when the source gives only a group
    group: int | None = None       # group index, when the source gives it directly
    gender: int = GENDER_UNKNOWN   # 0 male, 1 female
    race: int = RACE_UNKNOWN       # UTKFace codes 0-4
    split: str | None = None       # a split given by the source ('' = unused); None = assign one
    subject: str | None = None     # the person; a subject's images never straddle splits
    box: tuple | None = None       # face box x, y, w, h in pixels of the image
    eyes: tuple | None = None      # left_eye_x, left_eye_y, right_eye_x, right_eye_y (image left = smaller x)
    origin: str = ""               # where the row came from, for messages ("labels.csv line 7")


class LabelSource:
    """The interface every label source implements."""

    name = "abstract"

    def rows(self, data_dir: Path, edges) -> tuple[list[LabelRow], list[Skip]]:
        raise NotImplementedError

    def settings(self) -> dict | None:
        """The label source's entry in the feature file's settings; None adds no entry."""
        return {"source": self.name}


def display_path(rel: str) -> str:
    """A path as printable UTF-8: bytes that are not UTF-8 (surrogate-escaped) become \\xNN escapes."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def list_files(data_dir: Path) -> list[Path]:
    """Every entry under data_dir (recursively) with an image suffix, regular file or not, in path order.

    Non-regular entries (FIFOs, sockets, folders named x.jpg) are listed too, so
    that ingest can skip them with a reason instead of leaving them out silently.
    Nothing is opened here (rglob only lists and stats).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist or is not a folder")
    found = [p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(data_dir).as_posix())


def parse_name(name: str) -> tuple[int, int, int]:
    """'23_1_2_2017....jpg.chip.jpg' -> (age, gender, race). Raises ValueError with the reason."""
    match = _NAME.match(name)
    if not match:
        raise ValueError("name is not age_gender_race_datetime")
    age, gender = int(match["age"]), int(match["gender"])
    race = int(match["race"]) if match["race"] is not None else RACE_UNKNOWN
    if not 0 <= age <= MAX_AGE:
        raise ValueError(f"age {age} outside 0-{MAX_AGE}")
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} is not 0 or 1")
    if race != RACE_UNKNOWN and not 0 <= race <= 4:
        raise ValueError(f"race {race} is not 0-4")
    return age, gender, race


_PLAIN_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)


def parse_age(text: str) -> int:
    """'34' or '34.0' -> 34. Raises ValueError for anything else (no silent rounding).

    Plain decimal numbers only: float() would also read '2_5' as 25, '1e1' as 10 and '1e-400' as 0.
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"age {text!r} is not a number") from None
    if not _PLAIN_DECIMAL.fullmatch(text):
        raise ValueError(f"age {text!r} is not a plain decimal number (digits, optionally .0)")
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"age {text!r} is not a whole number of years")
    return int(value)


def inside_data_folder(path: Path, given_dir: Path, resolved_dir: Path) -> Path:
    """The data-folder-relative form of an absolute label path, or ValueError when it is outside.

    Tried as written against the folder as given (a path through a link inside the folder is accepted like
    its relative form), then with every link resolved.
    """
    if ".." in path.parts:
        raise ValueError("path leaves the data folder ('..')")
    for candidate, folder in ((path, given_dir), (path.resolve(), resolved_dir)):
        try:
            return candidate.relative_to(folder)
        except ValueError:
            continue
    raise ValueError("path is outside the data folder")


def parse_group(text: str, edges) -> int:
    """A group index ('2') or an age range ('26-50') that must be one of the groups given by `edges`."""
    names = group_names(edges)
    match = _RANGE.match(text)
    if match:
        wanted = f"{int(match[1])}-{int(match[2])}"
        if wanted not in names:
            raise ValueError(f"age range {text.strip()} is not one of the groups {', '.join(names)}")
        return names.index(wanted)
    try:
        index = int(text)
    except ValueError:
        raise ValueError(f"group {text!r} is neither a group index nor an age range like 26-50") from None
    if not 0 <= index < len(names):
        raise ValueError(f"group {index} outside 0-{len(names) - 1} (groups {', '.join(names)})")
    return index


class UTKFaceNames(LabelSource):
    """Ages, gender and race from UTKFace file names (the default source)."""

    name = "utkface-names"

    def rows(self, data_dir, edges):
        data_dir = Path(data_dir)
        rows, skipped = [], []
        for path in list_files(data_dir):
            rel = path.relative_to(data_dir).as_posix()
            try:
                age, gender, race = parse_name(path.name)
            except ValueError as err:
                skipped.append(Skip(display_path(rel), f"bad name: {err}"))
                continue
            rows.append(LabelRow(rel, age=age, gender=gender, race=race))
        return rows, skipped

    def settings(self):
        return None  # the default: files keep the fingerprints they had before label sources existed


class ClassFolders(LabelSource):
    """DATA/<label>/**/*.jpg: the first folder below DATA names the age (34) or the age range (26-50)."""

    name = "folders"

    def rows(self, data_dir, edges):
        data_dir = Path(data_dir)
        rows, skipped = [], []
        for path in list_files(data_dir):
            rel = path.relative_to(data_dir).as_posix()
            parts = rel.split("/")
            if len(parts) < 2:
                skipped.append(Skip(display_path(rel), "not inside a label folder (DATA/<age or range>/...)"))
                continue
            label = parts[0]
            try:
                if _RANGE.match(label):
                    rows.append(LabelRow(rel, group=parse_group(label, edges)))
                else:
                    rows.append(LabelRow(rel, age=parse_age(label)))
            except ValueError as err:
                skipped.append(Skip(display_path(rel), f"bad label folder {display_path(label)!r}: {err}"))
        return rows, skipped


DELIMITERS = {"comma": ",", "tab": "\t", "semicolon": ";", "space": " "}


FIELDS = ("path", "age", "group", "gender", "race", "split", "subject", "x", "y", "w", "h",
          "left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y")


BOX_FIELDS = ("x", "y", "w", "h")


EYE_FIELDS = ("left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y")


# Named layouts of real datasets' label files. Each entry: delimiter, header, and
# our field -> their column (a name with a header, a 0-based position without).
PRESETS = {
    # APPA-REAL gt_avg_{train,valid,test}.csv: file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age
    "appa-real": {"delimiter": "comma", "header": True, "columns": {"path": "file_name", "age": "real_age"}},
    # The same file, pointing at APPA-REAL's aligned face crops (000001.jpg -> 000001.jpg_face.jpg).
    "appa-real-face": {"delimiter": "comma", "header": True, "columns": {"path": "file_name", "age": "real_age"},
                       "path_suffix": "_face.jpg"},
    # A headerless two-column TSV "relative/path<TAB>age", as many age lists ship.
    "path-age-tsv": {"delimiter": "tab", "header": False, "columns": {"path": 0, "age": 1}},
}


@dataclass(frozen=True)
class CsvFormat:
    delimiter: str = "comma"                 # a key of DELIMITERS
    header: bool = True
    columns: tuple = ()                      # ((field, their column name or 0-based index), ...)
    path_suffix: str = ""                    # appended to every path (a preset's naming rule)

    def as_dict(self) -> dict:
        found = {"delimiter": self.delimiter, "header": self.header, "columns": dict(self.columns)}
        return {**found, "path_suffix": self.path_suffix} if self.path_suffix else found


def parse_columns(text: str | None, header: bool) -> dict:
    """--label-columns: 'path=file_name,age=real_age' (rename) or, without a header, 'path,age,-,gender'
    (fields by position; '-' skips a column). Also 'path=0,age=4' by position."""
    if not text:
        return {}
    mapping = {}
    items = [t.strip() for t in text.split(",")]
    for position, item in enumerate(items):
        field, sep, column = (p.strip() for p in item.partition("="))
        if not sep:
            if header:
                raise ValueError(f"--label-columns: {item!r} needs the form FIELD=COLUMN when the file has a header")
            if field in ("-", ""):
                continue
            column = position
        elif not header or column.isdigit():
            if not column.isdigit():
                raise ValueError(f"--label-columns: without a header, {item!r} must name a 0-based position")
            column = int(column)
        if field not in FIELDS:
            raise ValueError(f"--label-columns: unknown field {field!r}; fields are {', '.join(FIELDS)}")
        mapping[field] = column
    return mapping


def make_csv_format(preset: str | None = None, delimiter: str | None = None, header: bool | None = None,
                    columns: str | None = None, labels_path: Path | None = None) -> CsvFormat:
    """A CsvFormat from a preset and/or explicit options (options override the preset)."""
    base = {"delimiter": None, "header": True, "columns": {}}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown label preset {preset!r}; presets are {', '.join(sorted(PRESETS))}")
        base = {**PRESETS[preset], "columns": dict(PRESETS[preset]["columns"])}
    if header is not None:
        base["header"] = header
    if delimiter is not None:
        if delimiter not in DELIMITERS:
            raise ValueError(f"--label-delimiter must be one of {', '.join(DELIMITERS)}, not {delimiter!r}")
        base["delimiter"] = delimiter
    if base["delimiter"] is None:  # by the file's extension only: never sniffed from the content
        base["delimiter"] = "tab" if labels_path and Path(labels_path).suffix.lower() == ".tsv" else "comma"
    if columns:
        base["columns"] = {**base["columns"], **parse_columns(columns, base["header"])}
    if not base["header"]:
        for field in ("path",):
            if field not in base["columns"]:
                raise ValueError("a label file without a header needs --label-columns naming at least the path "
                                 "and age (or group) positions, e.g. --label-columns path,age")
    return CsvFormat(base["delimiter"], bool(base["header"]), tuple(sorted(base["columns"].items())),
                     base.get("path_suffix", ""))


def read_text_file(path: Path, what: str) -> str:
    """A text file decoded as UTF-8 (a UTF-8 BOM is accepted); a file that is not UTF-8 is a ValueError
    naming the file, the byte offset and what to do."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror or err}") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{what} {path} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
                         f"(line {line}) is invalid in UTF-8 (Latin-1 or another legacy encoding?); "
                         f"save the file as UTF-8") from None


class CsvLabels(LabelSource):
    """Labels from a CSV/TSV file (see the module docstring for its columns)."""

    name = "csv"

    def __init__(self, labels_path: Path, fmt: CsvFormat = CsvFormat(), preset: str | None = None):
        self.labels_path = Path(labels_path)
        self.fmt = fmt
        self.preset = preset

    def settings(self):
        return {"source": self.name, "file": self.labels_path.name, "sha256": file_sha256(self.labels_path)[:16],
                "preset": self.preset, "format": self.fmt.as_dict()}

    def _records(self):
        """(line number, {field: text}) per data line, with the columns resolved."""
        text = read_text_file(self.labels_path, "labels file")
        delimiter = DELIMITERS[self.fmt.delimiter]
        if delimiter == " ":
            lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1)]
        else:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
            lines = [(reader.line_num, row) for row in reader]
        lines = [(n, row) for n, row in lines if any(cell.strip() for cell in row)]  # blank lines
        columns = dict(self.fmt.columns)
        if self.fmt.header:
            if not lines:
                raise ValueError(f"labels file {self.labels_path} is empty")
            found = [c.strip() for c in lines[0][1]]
            lines = lines[1:]
            position = {}
            for field in FIELDS:  # a field is found under its own name unless renamed
                name = columns.get(field, field)
                if isinstance(name, int):  # 'age=4' is a 0-based position, header or not
                    if name >= len(found):
                        raise ValueError(self._missing(f"column {name} (position given for {field})", found))
                    position[field] = name
                elif name in found:
                    position[field] = found.index(name)
                elif field in columns:
                    raise ValueError(self._missing(f"column {name!r} (given for {field})", found))
        else:
            position = {field: int(index) for field, index in columns.items()}
            found = None
        if "path" not in position:
            raise ValueError(self._missing("a 'path' column (name yours with --label-columns path=YOURS)", found))
        if "age" not in position and "group" not in position:
            raise ValueError(self._missing("an 'age' or 'group' column (name yours with --label-columns "
                                           "age=YOURS)", found))
        for fields in (BOX_FIELDS, EYE_FIELDS):
            present = [f for f in fields if f in position]
            if present and len(present) != len(fields):
                raise ValueError(self._missing(f"all of {','.join(fields)} (found only {','.join(present)})", found))
        for n, row in lines:
            if max(position.values()) >= len(row):
                yield n, None, f"line has {len(row)} fields, the columns need {max(position.values()) + 1}"
                continue
            yield n, {field: row[index].strip() for field, index in position.items()}, None

    def _missing(self, what: str, found) -> str:
        where = f"labels file {self.labels_path}"
        if found is None:
            return f"{where} lacks {what}"
        hint = ""
        if len(found) == 1 and ("\t" in found[0] or ";" in found[0]):
            hint = "; it looks like another delimiter: try --label-delimiter tab (or semicolon)"
        return f"{where} lacks {what}; columns found: {', '.join(repr(c) for c in found)}{hint}"

    def rows(self, data_dir, edges):
        self._given_dir = Path(os.path.abspath(data_dir))   # as given: an absolute path may pass through its links
        data_dir = Path(data_dir).resolve()
        rows, skipped = [], []
        for n, values, problem in self._records():
            origin = f"{self.labels_path.name} line {n}"
            if problem:
                skipped.append(Skip(f"({origin})", problem))
                continue
            path = values["path"] + self.fmt.path_suffix if values["path"] else ""
            try:
                rows.append(self._row(path, values, edges, data_dir, origin))
            except ValueError as err:
                skipped.append(Skip(path or f"({origin})", f"{err} ({origin})"))
        return rows, skipped

    def _row(self, path: str, values: dict, edges, data_dir: Path, origin: str) -> LabelRow:
        if not path:
            raise ValueError("empty path")
        rel = Path(path)
        if rel.is_absolute():
            rel = inside_data_folder(rel, self._given_dir, data_dir)
        if ".." in rel.parts:
            raise ValueError("path leaves the data folder ('..')")
        age = group = None
        if values.get("age"):
            age = parse_age(values["age"])
        if values.get("group"):
            group = parse_group(values["group"], edges)
        if age is None and group is None:
            raise ValueError("no age and no group")
        split = values.get("split")
        if split is not None and split not in SPLIT_NAMES + ("",):
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLIT_NAMES)} (or empty for unused)")
        return LabelRow(
            rel.as_posix(), age=age, group=group, gender=_gender(values.get("gender", "")),
            race=_race(values.get("race", "")), split=split, subject=values.get("subject") or None,
            box=_numbers(values, BOX_FIELDS), eyes=_numbers(values, EYE_FIELDS), origin=origin)


def _gender(text: str) -> int:
    value = text.strip().lower()
    if value in ("", "-1"):  # -1: unknown, as stored in feature files
        return GENDER_UNKNOWN
    codes = {"0": 0, "m": 0, "male": 0, "man": 0, "1": 1, "f": 1, "female": 1, "woman": 1}
    if value not in codes:
        raise ValueError(f"gender {text!r} is not 0/1, m/f or male/female")
    return codes[value]


def _race(text: str) -> int:
    if text.strip() in ("", "-1"):  # -1: unknown, as stored in feature files
        return RACE_UNKNOWN
    try:
        race = int(text)
    except ValueError:
        raise ValueError(f"race {text!r} is not a UTKFace race code 0-4") from None
    if not 0 <= race <= 4:
        raise ValueError(f"race {race} is not 0-4")
    return race


def _numbers(values: dict, fields) -> tuple | None:
    """Four coordinates, or None when the columns are absent or all empty on this row."""
    if fields[0] not in values or all(values[f] == "" for f in fields):
        return None
    try:
        numbers = tuple(float(values[f]) for f in fields)
    except ValueError:
        raise ValueError(f"{','.join(fields)} must be numbers, got {[values[f] for f in fields]}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{','.join(fields)} must be finite, got {numbers}")
    return numbers


def describe_label_source(settings: dict) -> str:
    """Where a feature file's labels came from, in a few words (from its settings)."""
    labels = settings.get("labels")
    if not labels:
        return "UTKFace names"
    if labels.get("source") == "csv":
        preset = f", preset {labels['preset']}" if labels.get("preset") else ""
        return f"labels file {labels.get('file')}{preset}"
    if labels.get("source") == "folders":
        return "class folders"
    return str(labels.get("source"))


def make_source(labels: Path | None = None, folders: bool = False, preset: str | None = None,
                delimiter: str | None = None, header: bool | None = None, columns: str | None = None) -> LabelSource:
    """The label source the featurize options ask for (UTKFace names when none is given)."""
    if labels is not None and folders:
        raise ValueError("give either --labels FILE or --folders, not both")
    if labels is None and (preset or delimiter or header is not None or columns):
        raise ValueError("--label-preset, --label-delimiter, --label-columns and --label-no-header need --labels FILE")
    if folders:
        return ClassFolders()
    if labels is not None:
        return CsvLabels(labels, make_csv_format(preset, delimiter, header, columns, labels), preset)
    return UTKFaceNames()
