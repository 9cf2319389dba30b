"""fewstep's native classes for the published diffusion LMs, registered with the transformers Auto classes.

One flat package on purpose: an exported checkpoint carries these files (its family's configuration and modeling
files, and `diffusion_generation.py`) and their relative imports work the same inside fewstep and inside the
export folder. The `model_type`s are the published ones (`llada`, `Dream`, `dimple`), so a downloaded checkpoint
loads with its own config.json and safetensors, and `register_for_auto_class` makes `save_pretrained` write an
`auto_map` naming these files, as the published folders name theirs.
"""

from transformers import AutoConfig, AutoModel

from .configuration_dimple import DimpleConfig
from .configuration_dream import DreamConfig
from .configuration_llada import LLaDAConfig
from .modeling_dimple import DimpleModel
from .modeling_dream import DreamModel
from .modeling_llada import LLaDAModelLM

for _config, _model in ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel), (DimpleConfig, DimpleModel)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")

__all__ = ["DimpleConfig", "DimpleModel", "DreamConfig", "DreamModel", "LLaDAConfig", "LLaDAModelLM"]
