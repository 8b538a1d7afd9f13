"""featurize's label-source options (--labels, --label-preset, ..., --folders) as one decorator.

The decorated command receives one `label_source` argument: a labels.LabelSource,
or None for the default (ages from UTKFace file names).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from pipeline.ingest.labels import DELIMITERS, PRESETS, make_source


def label_source_options(command):
    @click.option("--labels", "label_file", type=click.Path(path_type=Path, dir_okay=False),
                  help="CSV/TSV of labels instead of UTKFace names: a 'path' column (relative to DATA_DIR) and "
                       "'age' or 'group' (index or range like 26-50); optional gender, race, split, subject, "
                       "x,y,w,h, left_eye_x,left_eye_y,right_eye_x,right_eye_y. A UTF-8 BOM is fine.")
    @click.option("--label-preset", type=click.Choice(sorted(PRESETS)),
                  help="Column layout of a known dataset's label file (see docs/featurize.md, Label sources).")
    @click.option("--label-columns",
                  help="Map fields to your columns: 'path=file_name,age=real_age'; without a header, fields by "
                       "position: 'path,age' or 'path,-,age' ('-' skips a column).")
    @click.option("--label-delimiter", type=click.Choice(sorted(DELIMITERS)),
                  help="Default: tab for .tsv files, else comma (never guessed from the content).")
    @click.option("--label-no-header", is_flag=True,
                  help="The labels file has no header line (name the columns with --label-columns).")
    @click.option("--folders", is_flag=True,
                  help="Class folders: DATA_DIR/<age or range such as 26-50>/.../*.jpg give the labels.")
    @functools.wraps(command)
    def wrapper(*args, label_file, label_preset, label_columns, label_delimiter, label_no_header, folders, **kwargs):
        if label_file is not None and not label_file.is_file():
            raise click.BadParameter(f"labels file {label_file} does not exist", param_hint="--labels")
        try:
            source = make_source(label_file, folders, label_preset, label_delimiter,
                                 False if label_no_header else None, label_columns)
        except ValueError as err:
            raise click.UsageError(str(err)) from err
        kwargs["label_source"] = None if source.settings() is None else source
        return command(*args, **kwargs)

    return wrapper
