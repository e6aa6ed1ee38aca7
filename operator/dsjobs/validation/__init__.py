"""The one validator of job specs and instance types, shared by the API and the operator.

Pure functions returning *all* problems at once, each naming its field path and rule:

    spec, problems = parse_job_spec(cr["spec"], known_instance_types=catalog_names)
    problems = validate_job_spec(spec)                 # a ProjectJobSpec already in hand
    problems = validate_job_parameters(params)         # e.g. after merging Clone overrides
    spec, problems = parse_instance_type(name, cr["spec"])
    message = format_problems(problems)                # `field: message [rule]` per line

Rules and limits are documented in docs/projectjob.md; the numbers live in dsjobs.models.limits.
"""

from dsjobs.validation.instancetype import parse_instance_type, validate_instance_type
from dsjobs.validation.job import (
    CMD_VAR_REFERENCE,
    cancel_reason_problems,
    cmd_references,
    data_ttl_problem,
    declared_vars,
    docker_reference_problem,
    parse_job_spec,
    validate_job_parameters,
    validate_job_spec,
)
from dsjobs.validation.problems import RULES, Problem, format_problems, problems_from_validation_error

__all__ = [
    "CMD_VAR_REFERENCE",
    "RULES",
    "Problem",
    "cancel_reason_problems",
    "cmd_references",
    "data_ttl_problem",
    "declared_vars",
    "docker_reference_problem",
    "format_problems",
    "parse_instance_type",
    "parse_job_spec",
    "problems_from_validation_error",
    "validate_instance_type",
    "validate_job_parameters",
    "validate_job_spec",
]
