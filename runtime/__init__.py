"""optforge runtime: loads artifacts and runs them (quantized layers, model loader) and serves them
(`LLM(artifact).generate(prompts, SamplingParams(...))`, `optforge serve`). Importing it stays torch-free."""

__all__ = ["LLM", "EngineConfig", "SamplingParams"]


def __getattr__(name: str):
    if name in ("LLM", "EngineConfig"):
        from optforge.runtime import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from optforge.runtime.sequence import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'optforge.runtime' has no attribute {name!r}")
