"""The SteadyDancer core, by job: sampling/, weights/, checkpoints/, model/, kernels/ (see ARCHITECTURE.md).
May import: torch and its libraries, each subpackage only those below it in that list; never ComfyUI or nodes/.
"""
