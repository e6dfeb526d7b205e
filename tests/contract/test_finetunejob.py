import pydantic
import pytest
import yaml

from kubetune.finetunejob import (
    API_VERSION,
    AdapterType,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Hyperparameters,
    JobPhase,
    MethodType,
    fine_tuned_model_name,
)
from kubetune.ids import new_job_id
from tests.harness.paths import REPO_ROOT

FILE_ID = "file-0mhx5k2ab00000000000001"


def spec(**overrides):
    return FineTuneJobSpec.model_validate(
        {"model": "tiny-llama", "trainingFile": FILE_ID, **overrides}
    )


def test_defaults_are_a_working_lora_sft_job():
    s = spec()
    assert s.method.type is MethodType.SUPERVISED
    assert s.adapter.type is AdapterType.LORA
    assert s.adapter.r == 16
    assert s.adapter.target_modules == ["all-linear"]
    assert s.resources.nodes == 1
    assert s.serving.register_adapter is True
    assert s.org == "default"


def test_wire_format_is_camel_case_and_drops_absent_fields():
    wire = spec(suffix="x", method={"type": "dpo", "hyperparameters": {"beta": 0.2}}).to_wire()
    assert wire["trainingFile"] == FILE_ID
    assert wire["method"]["hyperparameters"] == {"beta": 0.2}
    assert wire["serving"] == {"register": True}
    assert "validationFile" not in wire
    assert "training_file" not in wire


@pytest.mark.parametrize(
    ("alias", "attribute"),
    [
        ("nEpochs", "n_epochs"),
        ("batchSize", "batch_size"),
        ("learningRateMultiplier", "learning_rate_multiplier"),
        ("beta", "beta"),
    ],
)
def test_auto_means_resolve_later(alias, attribute):
    hp = Hyperparameters.model_validate({alias: "auto"})
    assert getattr(hp, attribute) is None
    assert hp.to_wire() == {}


SOURCE_JOB = new_job_id()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"method": {"type": "rlhf"}}, "method.type"),
        ({"method": {"hyperparameters": {"nEpochs": -1}}}, "nEpochs"),
        ({"method": {"hyperparameters": {"beta": 0.1}}}, "beta applies only to method type dpo"),
        (
            {"method": {"type": "dpo", "hyperparameters": {"trainOnInputs": True}}},
            "train_on_inputs applies only to method type supervised",
        ),
        (
            {"method": {"type": "dpo", "hyperparameters": {"packing": True}}},
            "packing applies only to method type supervised",
        ),
        ({"method": {"hyperparameters": {"lrSchedulerType": "step"}}}, "lrSchedulerType"),
        ({"method": {"hyperparameters": {"weightDecay": 1.5}}}, "weightDecay"),
        ({"model": "ft:tiny:default::abcdefgh"}, "needs continueFrom.job"),
        ({"continueFrom": {"job": SOURCE_JOB}}, "continueFrom needs model"),
        (
            {
                "model": "ft:tiny:default::abcdefgh",
                "continueFrom": {"job": SOURCE_JOB},
                "adapter": {"type": "full"},
            },
            "not type full",
        ),
        (
            {"model": "ft:tiny:default::x", "continueFrom": {"job": "ftjob-../x"}},
            "continueFrom.job",
        ),
        ({"method": {"hyperparameters": {"maxGradNorm": -1}}}, "maxGradNorm"),
        ({"adapter": {"r": 12}}, "adapter.r"),
        ({"adapter": {"type": "qlora"}, "resources": {"gpusPerNode": 0}}, "qlora needs"),
        ({"suffix": "a:b"}, "suffix"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"trainingFile": "file-../../etc"}, "trainingFile"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"org": "Acme"}, "org"),
        ({"unknownField": 1}, "unknownField"),
        ({"integrations": [{"type": "wandb"}]}, "needs a wandb block"),
    ],
)
def test_invalid_specs_name_the_field(overrides, fragment):
    with pytest.raises(pydantic.ValidationError) as excinfo:
        spec(**overrides)
    assert fragment in str(excinfo.value)


def test_the_documented_example_parses():
    doc = yaml.safe_load((REPO_ROOT / "docs/examples/finetunejob.yaml").read_text())
    job = FineTuneJob.from_manifest(doc)
    assert job.api_version == API_VERSION
    assert job.spec.resources.nodes == 2
    assert job.spec.method.hyperparameters.batch_size is None


def test_status_round_trips_through_the_wire_format():
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "running",
            "step": 7,
            "totalSteps": 20,
            "progress": "7/20",
            "metrics": {"trainLoss": 1.25},
            "error": None,
        }
    )
    again = FineTuneJobStatus.model_validate(status.to_wire())
    assert again == status
    assert again.phase is JobPhase.RUNNING


@pytest.mark.parametrize(
    ("base", "suffix", "expected_prefix"),
    [
        ("llama-3.1-8b", "bot", "ft:llama-3.1-8b:acme:bot:"),
        ("llama-3.1-8b", None, "ft:llama-3.1-8b:acme::"),
        ("ft:llama-3.1-8b:acme:bot:abcd1234", "v2", "ft:llama-3.1-8b:acme:v2:"),
    ],
)
def test_fine_tuned_model_names_follow_openai(base, suffix, expected_prefix):
    name = fine_tuned_model_name(base, "acme", suffix, "ftjob-0mhx5k2ab00000000000001")
    assert name == expected_prefix + "00000001"


def test_merge_requests_are_read_from_the_annotations_the_api_writes() -> None:
    from kubetune.finetunejob import (
        MERGE_FAILED,
        MERGE_REPORTED,
        MERGE_REQUESTED,
        merge_annotation,
        merges_requested,
    )

    annotations = {
        merge_annotation(None): MERGE_REQUESTED,
        merge_annotation(40): MERGE_REQUESTED,
        merge_annotation(20): MERGE_FAILED + "out of memory",  # waits for the API to tell
        merge_annotation(10): MERGE_REPORTED,  # told; not asked again yet
        "kubetune.io/merge-step-x": MERGE_REQUESTED,  # written by hand, meaningless
        "kubetune.io/merge-step-0": MERGE_REQUESTED,
        "example.com/kubetune.io/merge-final": MERGE_REQUESTED,
    }
    assert merge_annotation(40) == "kubetune.io/merge-step-40"
    assert merges_requested(annotations) == [None, 40]
