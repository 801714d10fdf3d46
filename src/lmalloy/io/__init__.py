"""Hugging Face folder I/O: lazy memory-mapped reading, atomic streaming writing."""

from lmalloy.io.folder import ModelFolder, TensorInfo, check_finite, open_model
from lmalloy.io.writer import (
    ShardedWriter,
    atomic_output,
    check_output,
    clean_stale_tmp,
    copy_aux_files,
    st_dtype,
    write_state_dict,
)

__all__ = ["ModelFolder", "TensorInfo", "open_model", "check_finite", "ShardedWriter",
           "atomic_output", "check_output", "clean_stale_tmp", "copy_aux_files", "st_dtype",
           "write_state_dict"]
