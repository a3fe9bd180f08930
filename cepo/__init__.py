"""CEPO training pipeline: models, data, rollouts, rewards, teacher contexts and experience.

Submodules are imported on demand (`from cepo.experience import make_experience`), so importing
`cepo` itself stays cheap; `cepo.grading` in particular must stay importable without torch.
"""
