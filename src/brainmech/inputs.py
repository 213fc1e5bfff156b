"""The user's input files checked from their headers and values before torch loads: label tables, grids, label values, scenario names.

The command line runs these checks first, so that a mistake in an argument or a file is one ``error:`` line
within a second or two (nibabel reads a header without the voxels; a label map's values are one pass),
rather than after torch, the network and the files have loaded. The library's loaders use the same
functions, so both say the same thing.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml

from .choices import TISSUE_CLASSES, Tissue
from .errors import InputError

DEFAULT_LABEL_TABLE = {int(t): t.name.lower() for t in Tissue}  # 0 background, 1 csf, 2 gm, 3 wm, 4 dgm
LABEL_TABLE_FILES = "data/label_tables"  # label tables shipped in the package
# shipped label tables by the names label_table= takes: FreeSurfer's segmentations share its LUT's ids
LABEL_TABLE_NAMES = {"freesurfer": "freesurfer", "aseg": "freesurfer", "aparc+aseg": "freesurfer",
                     "aparc.a2009s+aseg": "freesurfer", "synthseg": "freesurfer", "wmparc": "freesurfer"}
MAX_RANGE_LABELS = 2**20  # a label table's range may span at most this many ids


def read_label_table(source: str | Path | Mapping | None) -> dict[int, str]:
    """Label -> tissue class table: ``{label: background|csf|gm|wm|dgm}`` from YAML or a dictionary of the same, or
    a shipped table by name (a string: ``freesurfer``, or its aliases ``aseg``, ``aparc+aseg``,
    ``aparc.a2009s+aseg``, ``synthseg``, ``wmparc``: :data:`LABEL_TABLE_NAMES`); None: the default labels (0
    background, 1 CSF, 2 GM, 3 WM, 4 deep GM).

    A key ``low-high`` (``1000-1035: gm``) covers both ends; a range that runs backwards, or two entries
    that name one label, are refused.
    """
    if source is None:
        return dict(DEFAULT_LABEL_TABLE)
    shipped = shipped_label_table(source)
    what = ("label_table=" if isinstance(source, Mapping) else
            f"label table {source}" if shipped is None else f"the shipped label table {source}")
    try:
        if isinstance(source, Mapping):
            entries = source
        else:
            text = shipped.read_text() if shipped is not None else Path(source).read_text()
            entries = yaml.load(text, Loader=_UniqueKeyLoader)
        if not isinstance(entries, Mapping):
            raise ValueError(f"found {type(entries).__name__}")
        table = _expand_ranges({key: str(tissue).lower() for key, tissue in entries.items()}, what)
    except FileNotFoundError:
        raise InputError(f"label table file not found: {source}; give a YAML file or a shipped table "
                         f"({', '.join(LABEL_TABLE_NAMES)})") from None
    except _DuplicateLabel as error:
        raise InputError(f"{what} lists label {error.label} twice (line {error.line}); give each label one "
                         "entry") from None
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot read {what}: expected 'label: tissue class' entries ({error})".splitlines()[0]) from None
    unknown = sorted({t for t in table.values() if t not in TISSUE_CLASSES})
    if unknown:
        raise InputError(f"{what} names unknown tissue classes {unknown}; use {list(TISSUE_CLASSES)}")
    return table


def shipped_label_table(source: object):
    """The shipped table file (an importlib resource) that a name such as ``freesurfer`` or ``aseg`` stands for,
    or None when ``source`` is no such name (a path, a mapping; a :class:`~pathlib.Path` is always a file)."""
    if not isinstance(source, str) or source.strip().lower() not in LABEL_TABLE_NAMES:
        return None
    name = LABEL_TABLE_NAMES[source.strip().lower()]
    return importlib.resources.files("brainmech").joinpath(f"{LABEL_TABLE_FILES}/{name}.yaml")


class _DuplicateLabel(Exception):
    def __init__(self, label: object, line: int):
        super().__init__(f"label {label} twice")
        self.label, self.line = label, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a mapping key written twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int)):
                if key in seen:
                    raise _DuplicateLabel(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep)


RANGE = re.compile(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*")  # a label table key 'low-high'


def _expand_ranges(entries: Mapping, what: str) -> dict[int, str]:
    """``{label or 'low-high': class}`` -> ``{label: class}``, every range expanded (both ends included); a
    backwards range, one wider than :data:`MAX_RANGE_LABELS`, or two entries naming one label are refused."""
    spans = []  # (low, high, the key as written)
    for key in entries:
        match = RANGE.fullmatch(key) if isinstance(key, str) else None
        if match:
            low, high = int(match[1]), int(match[2])
            if low > high:
                raise InputError(f"{what} has the range {key!r} that runs backwards; write it low-high "
                                 f"('{high}-{low}: {entries[key]}')")
            if high - low >= MAX_RANGE_LABELS:
                raise InputError(f"{what} has the range {key!r} of {high - low + 1} labels; a range spans at most "
                                 f"{MAX_RANGE_LABELS}")
        else:
            low = high = int(key)  # a label: an integer (or its text); anything else is reported by the caller
        spans.append((low, high, key))
    spans.sort(key=lambda span: span[:2])
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start <= end:
            raise InputError(f"{what} gives label {start} twice: the entries {first!r} and {second!r} overlap; give "
                             f"each label one entry")
    return {label: entries[key] for low, high, key in spans for label in range(low, high + 1)}


SCENARIO_FILES = "data/scenarios"  # named scenarios shipped in the package
INTRACRANIAL_MODES = ("auto", "labels", "derive")  # how the intracranial space is found, or a NIfTI mask
# atrophy-map writes its intent into the map's header (descrip), so that simulate can check the map's direction
INTENT_PREFIX = "brainmech atrophy-map: tissue "


def named_scenarios() -> list[str]:
    """Names of the scenarios shipped with brainmech."""
    folder = importlib.resources.files("brainmech").joinpath(SCENARIO_FILES)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_scenario_source(name_or_path: str | Path) -> None:
    """Refuse a scenario that is neither a shipped name nor an existing file (a typo), naming the shipped ones;
    its content is checked where it is read (:meth:`brainmech.scenarios.Scenario.load`)."""
    if str(name_or_path) in named_scenarios() or Path(name_or_path).is_file():
        return
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        raise InputError(f"scenario file not found: {name_or_path}")
    raise InputError(f"unknown scenario {str(name_or_path)!r}: give a YAML file or one of {named_scenarios()}")


def file_grid(path: str | Path, what: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """The 3D voxel shape (a 2D file gains a third axis of length 1) and affine of a NIfTI file, from its header
    alone; :class:`InputError` naming ``what`` when the file is missing, unreadable or not a volume."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        image = nib.load(path)
        shape = tuple(int(n) for n in image.shape)
    except Exception as error:  # nibabel raises many types for unreadable files
        raise InputError(f"cannot read {what} file {path}: {error}".splitlines()[0]) from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise InputError(f"{what} must be a 2D or 3D volume, got shape {shape} from {path}")
    return (*shape, 1) if len(shape) == 2 else shape, np.asarray(image.affine)


def resampling_hint(what: str, image: str | Path | None = None) -> str:
    """How to put a file on the image's grid: nearest neighbour for labels, linear for a map."""
    target = image or "t1.nii.gz"
    labels = "label" in what or "parcellation" in what or "mask" in what
    named = what.split()[-1]  # callers name the file last: "label map labels.nii.gz"
    source = named if named.endswith((".nii", ".nii.gz")) else "file.nii.gz"
    flag = "pass --resample-labels (simulate, atrophy-map, measure, estimate), or " if what.startswith("label map") else ""
    return (f"{flag}resample it onto the image grid ({'nearest neighbour' if labels else 'linear'}), e.g. "
            f"antsApplyTransforms -d 3 -i {source} -r {target} -n "
            f"{'NearestNeighbor' if labels else 'Linear'} -o resampled.nii.gz (identity transform), or FreeSurfer's "
            f"mri_vol2vol --regheader{' --interp nearest' if labels else ''}")


def check_grid(shape: tuple[int, ...], affine: np.ndarray, image_shape: tuple[int, ...], image_affine: np.ndarray,
               what: str, image: str | Path | None = None) -> None:
    """Refuse a file (``shape``, ``affine``) that does not lie on the image's voxel grid, saying how to resample."""
    if tuple(shape) != tuple(image_shape):
        raise InputError(f"{what} has shape {tuple(shape)} but the image has {tuple(image_shape)}; "
                         f"{resampling_hint(what, image)}")
    if not np.allclose(affine, image_affine, atol=1e-3):
        raise InputError(f"{what} has a different affine (voxel-to-world geometry) than the image; "
                         f"{resampling_hint(what, image)}")


def check_files(image: str | Path, others: Mapping[str, str | Path | None], labels: str | Path | None = None,
                label_table: str | Path | Mapping | None = None, *, resample_labels: bool = False) -> None:
    """Before any heavy work: the image and every other file (``{what: path}``, None skipped) readable and on the
    image's grid (:func:`check_grid`), and every value of ``labels`` (a label map, also on the grid unless
    ``resample_labels``) named by ``label_table`` (:func:`read_label_table`)."""
    image_shape, image_affine = file_grid(image, "image")
    for what, path in {**others, **({} if resample_labels else {"label map": labels})}.items():
        if path is not None:
            check_grid(*file_grid(path, what), image_shape, image_affine, f"{what} {path}", image)
    if labels is not None:
        check_label_values(label_values_of(labels), read_label_table(label_table), f"label map {labels}")


def label_values_of(path: str | Path) -> list[int]:
    """The distinct values of a label map file (refused when not whole numbers)."""
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as error:
        raise InputError(f"cannot read label map file {path}: {error}".splitlines()[0]) from None
    values = np.unique(data)
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
        raise InputError(f"label map {path} has non-integer values; pass integer tissue labels")
    return [int(v) for v in values]


def check_label_values(values: list[int], table: Mapping[int, str], what: str) -> None:
    """Refuse label values that the label -> class table does not name (``what`` names the map)."""
    outside = sorted(set(values) - set(table))
    if outside:
        shown = ", ".join(map(str, outside[:10])) + (" ..." if len(outside) > 10 else "")
        raise InputError(f"{what} has labels {shown} that are not in the label table {_table_summary(table)}; "
                         "pass a label_table= that names them (a shipped one: freesurfer)")


def _table_summary(table: Mapping[int, str]) -> str:
    """A label table's keys for a message: all of them when few, else their count and range."""
    keys = sorted(table)
    return str(keys) if len(keys) <= 12 else f"({len(keys)} labels, {keys[0]} to {keys[-1]})"


def map_intent(path: str | Path) -> str | None:
    """The direction (``loss`` or ``growth``) that ``brainmech atrophy-map`` wrote into a map's header, or None for
    a map it did not write (or an unreadable one: the loader reports that)."""
    import nibabel as nib

    try:
        description = bytes(nib.load(path).header["descrip"]).split(b"\0")[0].decode("ascii", "replace")
    except Exception:
        return None
    intent = description.removeprefix(INTENT_PREFIX) if description.startswith(INTENT_PREFIX) else None
    return intent if intent in ("loss", "growth") else None
