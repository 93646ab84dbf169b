"""Jobs: the data job, the main job (the whole chain), the drift check, retraining, and A/B
promotion or rollback."""

from typing import TYPE_CHECKING, Literal

import dagster as dg
from pydantic import Field

from cifar_assets.assets.monitoring_assets import incoming_batches
from cifar_assets.resources import MLflowResource, TritonResource, rollout_for

if TYPE_CHECKING:
    from cifar_assets.serving.rollout import Rollout


DATA_ASSETS = ["cifar10_raw", "cifar10_splits", "validation_report", "image_features"]
MODEL_ASSETS = ["trained_model", "model_evaluation", "registered_model", "onnx_model"]

data_job = dg.define_asset_job(
    name="data_job",
    selection=dg.AssetSelection.assets(*DATA_ASSETS),
    description="Load, split, validate and featurize the data set.",
)

main_job = dg.define_asset_job(
    name="main_job",
    selection=dg.AssetSelection.assets(
        *DATA_ASSETS, *MODEL_ASSETS, "triton_deployment", "drift_baseline"
    ),
    description="The whole chain: data, validation, features, training, evaluation, "
    "registration, ONNX export, deployment to Triton and the drift baseline.",
    tags={"cifar/training": "true"},  # the stack's run queue trains one run at a time
)

drift_check_job = dg.define_asset_job(
    name="drift_check_job",
    selection=dg.AssetSelection.assets("incoming_batch", "drift_report"),
    partitions_def=incoming_batches,
    description="Load one batch of production data and check it for drift.",
)

retraining_job = dg.define_asset_job(
    name="retraining_job",
    selection=dg.AssetSelection.assets(
        *DATA_ASSETS, *MODEL_ASSETS, "triton_deployment", "drift_baseline"
    ),
    description="Retrain (with the drifted batch when it is labelled), register the model as "
    "challenger and deploy it to Triton beside the champion with a share of the traffic.",
    tags={"purpose": "retraining", "cifar/training": "true"},
)


rollout_job = dg.define_asset_job(
    name="rollout_job",
    selection=dg.AssetSelection.assets("ab_test_report"),
    config={"ops": {"ab_test_report": {"config": {"apply_rollout": True}}}},
    description="Judge the running stage of a staged rollout on the captured traffic and carry "
    "out the verdict (next stage, promotion, or rollback); rollout_sensor launches it.",
    tags={"purpose": "rollout"},
)


class PromotionConfig(dg.Config):
    action: Literal["apply_decision", "promote", "rollback"] = Field(
        default="apply_decision",
        description="apply_decision: do what the latest ab_test_report decided (nothing while it "
        "says keep_testing); promote / rollback: force that outcome of the running A/B test.",
    )
    reason: str = Field(default="", description="Why, for the audit record (forced actions).")


def _checked(context: dg.OpExecutionContext, rollout: "Rollout") -> None:
    """Fail the run when the transition left MLflow and serving disagreeing."""
    problems = rollout.check(server_ready=rollout.server_ready)
    if problems:
        raise dg.Failure("Serving does not follow the registry: " + "; ".join(problems))
    state = rollout.state()
    context.log.info(
        f"champion v{state.champion}, challenger {state.challenger or 'none'}, live "
        f"{state.live_versions}, weights {state.to_dict()['weights']}"
    )


@dg.op(
    description="Apply an A/B outcome through the rollout: promote makes the challenger champion "
    "with the champion's traffic; rollback retires the challenger. MLflow aliases, Triton's live "
    "versions and the router's weights move together, with a journal record.",
)
def apply_ab_outcome(
    context: dg.OpExecutionContext,
    config: PromotionConfig,
    mlflow: MLflowResource,
    triton: TritonResource,
) -> None:
    mlflow.end_orphaned_runs(context.instance, context.log)
    event = context.instance.get_latest_materialization_event(dg.AssetKey("ab_test_report"))
    if event is None or event.asset_materialization is None:
        raise dg.Failure("No ab_test_report yet: materialize it first (monitoring group).")
    metadata = event.asset_materialization.metadata
    decision = str(metadata["decision"].value)
    action = decision if config.action == "apply_decision" else config.action
    server = triton.ensure_running(context.log)
    rollout = rollout_for(mlflow, server.config)
    if action not in ("promote", "rollback"):
        context.log.info(f"The A/B test says {decision}: nothing to apply.")
        _checked(context, rollout)
        return
    treatment = int(metadata["treatment"].value)  # type: ignore[arg-type]
    if rollout.state().challenger != treatment:
        raise dg.Failure(
            f"The latest ab_test_report judged v{treatment}, but MLflow's challenger is now "
            f"{rollout.state().challenger or 'none'}; materialize ab_test_report again."
        )
    reason = config.reason or str(metadata["reason"].value)
    evidence = {
        "ab_test_report": event.run_id,
        **{key: metadata[key].value for key in ("decision", "srm_p_value", "sequential_p_value")},
    }
    actor = f"dagster run {context.run_id}"
    if action == "promote":
        rollout.promote(treatment, reason=f"A/B test: {reason}", actor=actor, evidence=evidence)
    else:
        rollout.retire(treatment, reason=f"A/B test: {reason}", actor=actor, evidence=evidence)
    context.log.info(f"{action}: v{treatment}")
    _checked(context, rollout)


@dg.job(description="Promote the A/B challenger or roll it back: aliases, Triton, router, audit.")
def promotion_job() -> None:
    apply_ab_outcome()


class RollbackConfig(dg.Config):
    reason: str = Field(description="Why the champion is rolled back (kept in the journal).")


@dg.op(description="Give the champion alias and its traffic back to the previous champion.")
def rollback_champion(
    context: dg.OpExecutionContext,
    config: RollbackConfig,
    mlflow: MLflowResource,
    triton: TritonResource,
) -> None:
    from cifar_assets.serving.rollout import RolloutError

    mlflow.end_orphaned_runs(context.instance, context.log)
    server = triton.ensure_running(context.log)
    rollout = rollout_for(mlflow, server.config)
    try:
        transition = rollout.rollback(reason=config.reason, actor=f"dagster run {context.run_id}")
    except RolloutError as error:
        raise dg.Failure(str(error)) from error
    context.log.info(f"Rolled back: champion v{transition.after['champion']}")
    _checked(context, rollout)


@dg.job(description="Roll the champion back to the previous one (registry and Triton).")
def rollback_job() -> None:
    rollback_champion()
