"""The embedded Dimple-family model, registered with the transformers Auto classes on import.

`register_for_auto_class` makes `save_pretrained` copy the configuration/modeling files next to the weights and
write `auto_map`, so a saved checkpoint also loads with `trust_remote_code=True` where fewstep is not installed.
"""

from transformers import AutoConfig, AutoModel

from .configuration_fewstep_dimple import FewstepDimpleConfig
from .modeling_fewstep_dimple import FewstepDimpleModel

AutoConfig.register(FewstepDimpleConfig.model_type, FewstepDimpleConfig, exist_ok=True)
AutoModel.register(FewstepDimpleConfig, FewstepDimpleModel, exist_ok=True)
FewstepDimpleConfig.register_for_auto_class()
FewstepDimpleModel.register_for_auto_class("AutoModel")

__all__ = ["FewstepDimpleConfig", "FewstepDimpleModel"]
