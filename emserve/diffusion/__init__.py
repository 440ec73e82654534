"""Diffusion arithmetic in numpy: noise schedules, objectives, samplers and classifier-free guidance.

Nothing here knows about torch, files or HTTP: a model is any ``denoise(x_t, t, cond) -> prediction`` callable
(an ONNX session, a TorchScript module, a Triton client or a closed-form test denoiser), so the same sampling
loop serves every backend and is tested against exact denoisers.
"""

from .guidance import Denoise, Guidance, classifier_free_guidance, rescale_guided
from .objectives import DATA_RANGE, OBJECTIVES, check_objective, convert, from_x0_eps, to_x0_eps, training_target
from .samplers import (
    DEFAULT_LABEL_DRAWS,
    DEFAULT_LABEL_GUIDANCE,
    DEFAULT_LABEL_SAMPLER,
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    SAMPLERS,
    DPMSolverPP,
    Progress,
    ddim_step,
    ddpm_step,
    sample,
)
from .schedules import (
    SCHEDULES,
    SPACINGS,
    NoiseSchedule,
    cosine_schedule,
    linear_schedule,
    make_schedule,
    sigmoid_schedule,
)

__all__ = [
    "DATA_RANGE",
    "DEFAULT_LABEL_DRAWS",
    "DEFAULT_LABEL_GUIDANCE",
    "DEFAULT_LABEL_SAMPLER",
    "DEFAULT_SAMPLER",
    "DEFAULT_SPACING",
    "DEFAULT_STEPS",
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "DPMSolverPP",
    "Denoise",
    "Guidance",
    "NoiseSchedule",
    "Progress",
    "check_objective",
    "classifier_free_guidance",
    "convert",
    "cosine_schedule",
    "ddim_step",
    "ddpm_step",
    "from_x0_eps",
    "linear_schedule",
    "make_schedule",
    "rescale_guided",
    "sample",
    "sigmoid_schedule",
    "to_x0_eps",
    "training_target",
]
