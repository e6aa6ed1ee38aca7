"""Nothing a client sends makes Create's conversion + validation fail with anything but problems.

The servicer turns ConversionError / pydantic ValidationError / validation problems into
INVALID_ARGUMENT; any other exception would surface as INTERNAL. Arbitrary requests must never
get there.
"""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dsjobs.api.errors import from_problems
from dsjobs.convert import params as params_conv
from dsjobs.convert.common import ConversionError
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.validation import validate_job_spec

text = st.text(max_size=40)
big_int = st.integers(min_value=-(2**63), max_value=2**63 - 1)

files = st.builds(
    lambda path, var, sha, size, comp: jobs_pb2.File(
        desc=jobs_pb2.FileDesc(path=path, var=var), sha256=sha, size_bytes=size, compression_type=comp
    ),
    text,
    text,
    st.one_of(text, st.text("0123456789abcdef", min_size=64, max_size=64)),
    big_int,
    st.integers(min_value=0, max_value=9),
)
# conda_yaml: YAML text, including what PyYAML's constructors reject with plain errors.
conda_yaml = st.one_of(
    text,
    st.sampled_from(["a: 2001-02-30", "x: !!float abc", "x: !!int '0x'", "x: !!timestamp 'zz'", "[" * 1000]),
    st.builds(lambda k, v: f"{k}: {v}", text, text),
)
env = st.builds(
    lambda vars_, image, password, version, reqs, conda: jobs_pb2.Environment(
        vars=vars_,
        docker_image_spec=jobs_pb2.DockerImageSpec(image_url=image, password_plain_text=password),
        python_env=jobs_pb2.PythonEnv(python_version=version, requirements=reqs, conda_yaml=conda),
    ),
    st.dictionaries(text, text, max_size=4),
    text,
    text,
    text,
    st.lists(text, max_size=3),
    conda_yaml,
)
# Any Duration the wire can carry (proto int64 seconds, int32 nanos), not only valid ones.
durations = st.builds(
    lambda s, n: Duration(seconds=s, nanos=n), big_int, st.integers(min_value=-(2**31), max_value=2**31 - 1)
)
params = st.builds(
    lambda inputs, outputs, cmd, e, types, storage, sig, timeout, args: jobs_pb2.JobParameters(
        input_files=inputs,
        output_files=outputs,
        cmd=cmd,
        env=e,
        cloud_instance_types=[jobs_pb2.CloudInstanceType(name=t) for t in types],
        extended_working_storage=jobs_pb2.ExtendedWorkingStorage(type=storage[0], size_gb=storage[1]),
        graceful_shutdown_parameters=jobs_pb2.GracefulShutdownParameters(signal=sig, timeout=timeout),
        arguments=[jobs_pb2.Argument(name=n, value=v) for n, v in args],
    ),
    st.lists(files, max_size=3),
    st.lists(st.builds(lambda p, v: jobs_pb2.FileDesc(path=p, var=v), text, text), max_size=3),
    text,
    env,
    st.lists(text, max_size=2),
    st.tuples(st.integers(0, 5), big_int),
    big_int,
    durations,
    st.lists(st.tuples(text, text), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(params, text, text, durations)
def test_create_requests_only_ever_produce_problems(
    p: jobs_pb2.JobParameters, name: str, project: str, ttl: Duration
) -> None:
    req = svc.CreateProjectJobRequest(project_id=project, job_parameters=p, name=name, data_ttl=ttl)
    try:
        spec = params_conv.spec_from_create_request(
            req, created_by_id="alice", docker_password_secret_name="j-docker-password"
        )
    except (ConversionError, ValidationError):
        return
    problems = validate_job_spec(spec, known_instance_types={"c1.4"})
    if problems:
        assert from_problems(problems).message.startswith("invalid request:")
