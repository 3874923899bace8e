"""The pipeline's stages as plain functions, in one import for the Dagster assets, the benchmarks and the tests:
dataset -> probe set -> base model -> model probes -> runs -> catalog -> learning curves.

Each stage lives with what it builds (the layout of an experiment's files in ldpipe.layout; the dataset stage in
ldpipe.data.stage; the probe stages in ldpipe.probes; the base model in ldpipe.model.base; runs in
ldpipe.training.runs; the catalog refresh in ldpipe.store.catalog; the curves in ldpipe.analysis.curves). Each
reads its inputs from and writes its outputs to files under the experiment's layout, needs no Dagster, and returns
a typed result (DatasetResult, ProbeSetResult, BaseModelResult, ModelProbesResult, RunResult, CurvesResult) that the
Dagster assets only turn into metadata. This module only names them.
"""
from ldpipe.analysis.curves import CurvesResult, learning_curves  # noqa: F401
from ldpipe.data.selection import training_rows  # noqa: F401
from ldpipe.data.stage import DatasetResult, build_dataset, load_dataset  # noqa: F401
from ldpipe.layout import ExperimentFiles, files_for, load_preferences_file, load_probes_file  # noqa: F401
from ldpipe.model.base import BaseModelResult, base_model_path, build_base_model  # noqa: F401
from ldpipe.probes.model_stage import ModelProbesResult, _cut, build_model_probes, model_fingerprint  # noqa: F401
from ldpipe.probes.stage import ProbeSetResult, build_probes  # noqa: F401
from ldpipe.store.catalog import refresh  # noqa: F401
from ldpipe.training.runs import RunResult, _training_examples, start_point, train_run  # noqa: F401
