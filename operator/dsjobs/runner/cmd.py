"""Pure ``cmd`` templating.

``${NAME}`` is replaced by, in this order of lookup (names are unique, the config enforces it):

- the var of an input or output: the absolute local path ``<work_dir>/<path>``;
- the id or var of an S3 mount or dataset: its mount path (the DataSphere CLI rewrites a mount's
  var to its id before sending, so both spellings work);
- an argument name: its value, verbatim;
- ``DS_PROJECT_HOME``: the project disk's mount path (only when the project disk is attached).

Values are inserted verbatim, without shell quoting (as on DataSphere): write ``"${VAR}"`` in
``cmd`` if a path may contain spaces. ``$${...}`` is the one escape: it becomes ``${...}`` for the
shell (``$${HOME}``, ``$${X:-1}``). ``$NAME``, ``$$`` and the rest of the shell's syntax are left
alone. The validator (dsjobs.validation) accepts a ``${NAME}`` only for the names above, with the
same pattern (dsjobs.syntax.CMD_REFERENCE_PATTERN); should an unknown one reach the runner
anyway, it is left as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dsjobs.runner.config import ENV_PROJECT_HOME, InputFile, OutputFile, RunnerConfig
from dsjobs.syntax import CMD_REFERENCE_PATTERN

_TEMPLATE_RE = re.compile(CMD_REFERENCE_PATTERN)


def cmd_variables(config: RunnerConfig) -> dict[str, str]:
    """Every name ``${...}`` can refer to in this job, with its value."""
    work = config.work_dir
    values: dict[str, str] = {}
    files: list[InputFile | OutputFile] = [*config.inputs, *config.outputs]
    for f in files:
        if f.var:
            values[f.var] = str(work / f.path)
    for m in (*config.s3_mounts, *config.datasets):
        values[m.id] = m.mount_path
        if m.var:
            values[m.var] = m.mount_path
    for m in config.output_datasets:
        # Its id is made by the operator: the job knows it by its var only.
        if m.var:
            values[m.var] = m.mount_path
    values.update(config.arguments)
    if config.project_disk_path:
        values[ENV_PROJECT_HOME] = config.project_disk_path
    return values


def render_cmd(template: str, variables: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "${" + m.group(2) + "}"
        return variables.get(m.group(2), m.group(0))

    return _TEMPLATE_RE.sub(sub, template)


def unknown_variables(template: str, variables: Mapping[str, str]) -> list[str]:
    """Names in ``${...}`` that are not job variables (left to the shell), in order, unique."""
    seen: list[str] = []
    for m in _TEMPLATE_RE.finditer(template):
        name = m.group(2)
        if not m.group(1) and name not in variables and name not in seen:
            seen.append(name)
    return seen


def render_config_cmd(config: RunnerConfig) -> str:
    return render_cmd(config.cmd, cmd_variables(config))
