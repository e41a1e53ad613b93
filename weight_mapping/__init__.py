"""Map vLLM's live (fused) weight tensors onto a transformers model, as views."""

from hooks.contract import WEIGHT_VERSION, pack_weight_version, unpack_weight_version
from hooks.load import LoadSnapshot
from weight_mapping.export_reader import Export, attach, wait_for_manifest
from weight_mapping.families import (
    FAMILIES,
    WRAPPERS,
    Family,
    Fusion,
    checkpoint_file_names,
    family_for,
    fuse_state_dict,
    hf_text_name,
    text_model_part,
)
from weight_mapping.mapping import UnmappedParameterError, build_model, load_config, shares_storage

__all__ = [
    "FAMILIES", "WEIGHT_VERSION", "WRAPPERS", "Export", "Family", "Fusion", "LoadSnapshot",
    "UnmappedParameterError", "attach",
    "build_model", "checkpoint_file_names", "family_for", "fuse_state_dict", "hf_text_name",
    "load_config", "pack_weight_version", "shares_storage", "text_model_part",
    "unpack_weight_version", "wait_for_manifest",
]
