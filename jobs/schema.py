"""The one schema of every Parquet table. Partition columns (``model``, and ``layer`` for activations)
live in the hive folder names, not inside the files; readers get them back from the path."""
import numpy as np
import pyarrow as pa

PARTITIONS = {"activations": ("model", "layer"), "corpus": ("shard",)}
DEFAULT_PARTITIONS = ("model",)

TABLES: dict[str, pa.Schema] = {
    # Once per run, shared by every model (the corpus stage); ``probe query`` joins it into ``tokens``.
    "corpus": pa.schema([
        ("chunk", pa.int32()), ("pos", pa.int32()), ("row", pa.int64()), ("token_id", pa.int32()),
        ("token", pa.string()), ("next_token_id", pa.int32()), ("is_proper_noun", pa.bool_()), ("source_file", pa.string()),
    ]),
    # Per model: only what the model computes (the file columns; the tokens view adds the corpus columns).
    "tokens": pa.schema([("chunk", pa.int32()), ("pos", pa.int32()), ("next_token_logit", pa.float32())]),
    "layer_metrics": pa.schema([
        ("chunk", pa.int32()), ("pos", pa.int32()), ("layer", pa.int16()),
        ("path_step", pa.float32()), ("path_cum", pa.float32()), ("angle_rad", pa.float32()),
    ]),
    "path_summary": pa.schema([
        ("n_tokens", pa.int64()), ("r_path_logit", pa.float64()), ("r_ci_low", pa.float64()), ("r_ci_high", pa.float64()),
    ]),
    "path_layer_r": pa.schema([
        ("layer", pa.int16()), ("n_tokens", pa.int64()), ("r", pa.float64()), ("r_ci_low", pa.float64()), ("r_ci_high", pa.float64()),
    ]),
    "rotation_angles": pa.schema([
        ("target", pa.string()), ("source", pa.string()), ("chunk", pa.int32()), ("pos", pa.int32()),
        ("layer", pa.int16()), ("kind", pa.string()), ("angle_rad", pa.float32()),
    ]),
    "rotation": pa.schema([
        ("target", pa.string()), ("source", pa.string()), ("layer", pa.int16()), ("n", pa.int32()),
        ("mean_target_rad", pa.float64()), ("mean_previous_rad", pa.float64()), ("mean_shuffled_rad", pa.float64()),
        ("t", pa.float64()), ("p", pa.float64()), ("significant", pa.bool_()), ("d_z", pa.float64()),
        ("diff_ci_low_rad", pa.float64()), ("diff_ci_high_rad", pa.float64()),
    ]),
    "activations": pa.schema([
        ("chunk", pa.int32()), ("pos", pa.int32()), ("label", pa.bool_()), ("values", pa.list_(pa.float16())),
    ]),
    "neuron_logit": pa.schema([
        ("layer", pa.int16()), ("neuron", pa.int32()), ("n", pa.int32()), ("beta", pa.float64()), ("se", pa.float64()),
        ("z", pa.float64()), ("p", pa.float64()), ("beta_ci_low", pa.float64()), ("beta_ci_high", pa.float64()),
        ("auroc", pa.float64()), ("significant", pa.bool_()), ("q_bh", pa.float64()),
        ("status", pa.string()), ("converged", pa.bool_()), ("n_iter", pa.int16()),
    ]),
    "neuron_heatmap": pa.schema([
        ("layer", pa.int16()), ("neuron", pa.int32()), ("chunk", pa.int32()), ("pos", pa.int32()),
        ("activation", pa.float32()), ("sampled", pa.bool_()), ("in_sample_chunk", pa.bool_()),
    ]),
    "mi": pa.schema([("layer", pa.int16()), ("dim_i", pa.int32()), ("dim_j", pa.int32()), ("mi_bits", pa.float64()),
                     ("mi_bits_mm", pa.float64()), ("above_null", pa.bool_())]),
    "mi_null": pa.schema([("layer", pa.int16()), ("dim_i", pa.int32()), ("dim_j", pa.int32()), ("mi_bits", pa.float64())]),
    "mi_summary": pa.schema([
        ("layer", pa.int16()), ("n_tokens", pa.int32()), ("mean_bits", pa.float64()), ("median_bits", pa.float64()),
        ("p05_bits", pa.float64()), ("p95_bits", pa.float64()), ("mean_bits_mm", pa.float64()),
        ("null_mean_bits", pa.float64()), ("null_p95_bits", pa.float64()), ("null_p99_bits", pa.float64()),
        ("excess_mean_bits", pa.float64()),
    ]),
    "attn_norms": pa.schema([("chunk", pa.int32()), ("pos", pa.int32()), ("layer", pa.int16()), ("log_norm", pa.float32())]),
    "attn_ar": pa.schema([
        ("layer", pa.int16()), ("chunk", pa.int32()), ("n", pa.int32()), ("b0", pa.float64()), ("b1", pa.float64()),
        ("b2", pa.float64()), ("p1", pa.float64()), ("p2", pa.float64()), ("r2", pa.float64()), ("status", pa.string()),
        ("significant1", pa.bool_()), ("significant2", pa.bool_()),
    ]),
}


def partition_keys(table: str) -> tuple[str, ...]:
    return PARTITIONS.get(table, DEFAULT_PARTITIONS)


VALUE_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


def file_schema(table: str, d_mlp: int | None = None, values_dtype: str = "float16") -> pa.Schema:
    """Schema of the files of a table (``activations`` values become a fixed-size list of d_mlp of
    ``values_dtype``, the run's --activations-dtype)."""
    schema = TABLES[table]
    if table == "activations" and d_mlp is not None:
        field = pa.field("values", pa.list_(VALUE_TYPES[values_dtype], d_mlp))
        schema = schema.set(schema.get_field_index("values"), field)
    return schema


def table_layers(n_layer: int) -> np.ndarray:
    """The layer numbers tables store for per-block values: blocks 1..n_layer (int16). ``layer_metrics``
    layer l compares hidden_states[l-1] with hidden_states[l]; ``mi.layer`` is the hidden_states index
    itself (0..n_layer) and does not go through here."""
    return np.arange(1, n_layer + 1, dtype=np.int16)


def block_index(layer: int) -> int:
    """A table layer (block 1..n_layer) -> the block's index in ``model.transformer.h`` (0-based)."""
    return int(layer) - 1
