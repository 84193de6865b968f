from sagaq import SagaState


def test_happy_path_runs_every_step_once(runtime, worker, wait_settled):
    from tasks.services import services

    saga_id = runtime.engine.enqueue("provision_agent", {"agent": "a-1"})
    assert wait_settled(saga_id) == [SagaState.COMPLETED]
    landed = [c.step for s in services.values() for c in s.effects(saga_id=saga_id)]
    assert sorted(landed) == sorted(
        ["create_identity", "assign_roles", "allocate_runtime", "inject_credentials"]
    )
