"""RASA, in one place: applying stored position directions (`directions`), measuring how much position patch
tokens encode (`probe`), the official step-by-step formula used as an independent check (`reference`), and learning
new directions on a frozen backbone (`train`, the `franca-hf rasa` command; imported on demand, it needs the
trainer).

The model file keeps its own vectorised copy of the direction math (`franca_hf.modeling.remove_position_directions`),
which `directions` uses: exported folders must run without franca_hf.
"""

from ..lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "directions": (
            "DIRECTIONS_FILE",
            "RasaDirections",
            "patch_tokens",
        ),
        "probe": (
            "evaluate_chain",
            "grid_coordinates",
            "linear_probe_r2",
            "probe_r2",
            "probe_sample_problem",
        ),
        "reference": ("official_rasa_chain",),
    },
)

__all__ = [
    "DIRECTIONS_FILE",
    "RasaDirections",
    "evaluate_chain",
    "grid_coordinates",
    "linear_probe_r2",
    "official_rasa_chain",
    "patch_tokens",
    "probe_r2",
    "probe_sample_problem",
]
