"""arch layer: model architectures as data (dense / MoE, MHA / GQA / MLA) and their FLOPs and bytes per token.

Public API: `Arch` (the spec, with counting methods), `load_arch(name_or_path)`, `arch_names()`, `Dtype`,
`BYTES_PER_ELEMENT`; `matrixstack.arch.hf_import` turns a Hugging Face config.json into an arch YAML;
`matrixstack.arch.registry` keeps local Hugging Face folders registered under a name, which `load_arch` accepts.
"""

from matrixstack.arch.loader import arch_names, load_arch
from matrixstack.arch.spec import BYTES_PER_ELEMENT, Arch, Dtype

__all__ = ["BYTES_PER_ELEMENT", "Arch", "Dtype", "arch_names", "load_arch"]
