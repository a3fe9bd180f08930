"""CEPO training pipeline, in layers (each imports only the ones below it):

* the method: `config` (no torch), `batch`, `data`, `models`, `rollout`, `grading`, `reward`,
  `group_advantages` (GRPO A), `negatives` (r− choice), `contexts` (teacher prefixes), `scoring`
  (the one scoring core: old log-probs, Δ, w, Â), `diagnostics`, `experience`, `update`;
* on top: the native trainer (`train`, `eval`, `lora`, ...), the integrations
  (`cepo.integrations.trl`) and the offline kit (`cepo.offline`: tiny models, warm-up, synthetic
  sets), which the method reaches only through the names it registers in `cepo.registry`.

Submodules are imported on demand (`from cepo.experience import make_experience`), so importing
`cepo` itself stays cheap; `cepo.grading` in particular must stay importable without torch.
"""
