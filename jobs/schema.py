"""The one schema of every Parquet table: the corpus stage's ``corpus`` and each analysis's tables (its own
module declares them). Partition columns (``model``, ``layer``, ``shard``) live in the hive folder names,
not inside the files; readers get them back from the path."""
from jobs import analyses
from jobs.corpus import CORPUS
from jobs.store import Table


def all_tables() -> dict[str, Table]:
    return {CORPUS.name: CORPUS, **analyses.tables()}
