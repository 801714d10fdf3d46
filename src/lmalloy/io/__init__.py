"""Hugging Face folder I/O: lazy reading, atomic streaming writing, the run layout."""

from lmalloy.io.dtypes import st_dtype
from lmalloy.io.folder import ModelFolder, TensorInfo, check_finite, compare_tensors, open_model
from lmalloy.io.writer import (
    ShardedWriter,
    atomic_output,
    atomic_write_text,
    check_output,
    clean_stale_tmp,
    copy_aux_files,
    write_config,
    write_state_dict,
)

__all__ = ["ModelFolder", "TensorInfo", "open_model", "check_finite", "compare_tensors",
           "ShardedWriter", "atomic_output", "atomic_write_text", "check_output",
           "clean_stale_tmp", "copy_aux_files", "st_dtype", "write_config", "write_state_dict"]
