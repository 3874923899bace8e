"""Resources: where ldpipe keeps its files, and which device long work runs on."""

from pathlib import Path

import dagster as dg

from ldpipe.paths import Paths, project_dir


class LdpipeHome(dg.ConfigurableResource):
    """The ldpipe home (Parquet store, DuckDB catalog, checkpoints). Empty: LDPIPE_HOME or <project>/.ldpipe."""

    home: str = ""
    sql_dir: str = ""

    def paths(self) -> Paths:
        return (Paths(Path(self.home).resolve()) if self.home else Paths.default()).ensure()

    def sql_path(self) -> Path:
        return Path(self.sql_dir).resolve() if self.sql_dir else project_dir() / "sql"


class Compute(dg.ConfigurableResource):
    """Device for training and scoring: "auto" picks CUDA when present, else CPU.

    `nproc_per_node` > 1: run assets train data-parallel, launched through torchrun with that many processes
    (one per GPU; gloo on CPU), see docs/scaling.md."""

    device: str = "auto"
    nproc_per_node: int = 1


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"ldpipe_home": LdpipeHome(), "compute": Compute()})
