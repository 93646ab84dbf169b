"""Jobs: the data job, the main job (the whole chain), the drift check, retraining, and A/B
promotion or rollback."""

from typing import Literal

import dagster as dg
from pydantic import Field

from cifar_assets.assets.monitoring_assets import incoming_batches
from cifar_assets.resources import MLflowResource, TritonResource

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
    tags={"purpose": "retraining"},
)


class PromotionConfig(dg.Config):
    action: Literal["apply_decision", "promote", "rollback"] = Field(
        default="apply_decision",
        description="apply_decision: do what the latest ab_test_report decided (nothing while it "
        "says keep_testing); promote / rollback: force that outcome of the running A/B test.",
    )
    reason: str = Field(default="", description="Why, for the audit record (forced actions).")


@dg.op(
    description="Apply an A/B outcome to MLflow aliases, Triton's live versions and the router's "
    "weights together, and append an audit record.",
)
def apply_ab_outcome(
    context: dg.OpExecutionContext,
    config: PromotionConfig,
    mlflow: MLflowResource,
    triton: TritonResource,
) -> dict:
    from cifar_assets.serving.promotion import apply_ab_decision

    event = context.instance.get_latest_materialization_event(dg.AssetKey("ab_test_report"))
    if event is None or event.asset_materialization is None:
        raise dg.Failure("No ab_test_report yet: materialize it first (monitoring group).")
    metadata = event.asset_materialization.metadata
    decision = str(metadata["decision"].value)
    action = decision if config.action == "apply_decision" else config.action
    if action not in ("promote", "rollback"):
        context.log.info(f"The A/B test says {decision}: nothing to apply.")
        return {"action": "none", "decision": decision}
    reason = config.reason or str(metadata["reason"].value)
    server = triton.ensure_running(context.log)
    record = apply_ab_decision(
        action,  # type: ignore[arg-type]
        control=int(metadata["control"].value),  # type: ignore[arg-type]
        treatment=int(metadata["treatment"].value),  # type: ignore[arg-type]
        reason=reason,
        tracking_uri=mlflow.uri(),
        model_name=mlflow.registered_model_name(),
        triton_url=server.config.http_url,
        repo=server.config.repo,
        state_dir=server.config.state_dir,
        actor=f"dagster run {context.run_id}",
    )
    context.log.info(f"{action}: champion v{record.champion_after}, live {record.live_versions}")
    return dict(vars(record))


@dg.job(description="Promote the A/B challenger or roll it back: aliases, Triton, router, audit.")
def promotion_job() -> None:
    apply_ab_outcome()


class RollbackConfig(dg.Config):
    reason: str = Field(description="Why the champion is rolled back (kept in the history).")


@dg.op(description="Move the MLflow champion alias back to the previous champion, and serve it.")
def rollback_champion(
    context: dg.OpExecutionContext,
    config: RollbackConfig,
    mlflow: MLflowResource,
    triton: TritonResource,
) -> int:
    from cifar_assets.ml import registry
    from cifar_assets.serving import repository

    champion = registry.rollback(
        mlflow.uri(), config.reason, mlflow.registered_model_name(), f"dagster run {context.run_id}"
    )
    server = triton.ensure_running(context.log)
    if champion.version in repository.list_versions(server.config.repo):
        url = server.config.http_url
        live = repository.read_live_versions(server.config.state_dir)
        repository.set_live_versions(
            url,
            sorted({*live, champion.version}),
            repo=server.config.repo,
            state_dir=server.config.state_dir,
        )
        repository.set_ab_weights({champion.version: 1.0}, state_dir=server.config.state_dir)
        repository.set_live_versions(
            url, [champion.version], repo=server.config.repo, state_dir=server.config.state_dir
        )
        context.log.info(f"Triton now serves v{champion.version} only")
    else:
        context.log.warning(
            f"v{champion.version} has no folder in {server.config.repo}; Triton is unchanged. "
            "Re-run onnx_model and triton_deployment for it."
        )
    return champion.version


@dg.job(description="Roll the champion back to the previous one (registry and Triton).")
def rollback_job() -> None:
    rollback_champion()
