import numpy as np, pytest
from cudnn_bn import BatchNorm
from cudnn_bn import distributed as dist
from group_checks import close, results, run_ranks, shards

@pytest.mark.parametrize("activation", [None, "relu"])
def test_changing(activation):
    plan = [[5, 0, 4], [0, 6, 3], [4, 5, 0], [1, 0, 1]]
    rng = np.random.default_rng(3)
    steps = [tuple(2.0 + 3.0 * rng.standard_normal((sum(s), 4, 3)) for _ in range(3)) for s in plan]
    single = BatchNorm(4, momentum=None, dtype=np.float64, activation=activation)
    expected = []
    for x, dy, r in steps:
        r = r if activation else None
        y = single(x, r); dx = single.backward(dy)
        expected.append((y, dx, single.grad_gamma.copy(), single.grad_beta.copy()))
    single.eval(); ye = single(steps[0][0], steps[0][2] if activation else None); dxe = single.backward(steps[0][1])
    def body(rank, group):
        layer = dist.SyncBatchNorm(4, group=group, momentum=None, dtype=np.float64, activation=activation)
        outs = []
        for s, (x, dy, r) in zip(plan, steps):
            y = layer(shards(x, s)[rank], shards(r, s)[rank] if activation else None)
            dx = layer.backward(shards(dy, s)[rank])
            outs.append((y, dx, layer.grad_gamma, layer.grad_beta))
        layer.eval()
        s = plan[0]
        y = layer(shards(steps[0][0], s)[rank], shards(steps[0][2], s)[rank] if activation else None)
        dx = layer.backward(shards(steps[0][1], s)[rank])
        return layer, outs, (y, dx, layer.grad_gamma)
    outcomes = results(run_ranks(3, body))
    for i, (y, dx, gg, gb) in enumerate(expected):
        close(np.concatenate([o[1][i][0] for o in outcomes]), y, np.float64, what="y")
        close(np.concatenate([o[1][i][1] for o in outcomes]), dx, np.float64, what="dx")
        for o in outcomes:
            close(o[1][i][2], gg, np.float64, what="gg", scale=50)
            assert o[1][i][2].tobytes() == outcomes[0][1][i][2].tobytes()
    for o in outcomes:
        assert o[0].num_batches_tracked == 4
        assert o[0].running_var.tobytes() == outcomes[0][0].running_var.tobytes()
        close(o[0].running_var, single.running_var, np.float64, what="rv")
    close(np.concatenate([o[2][0] for o in outcomes]), ye, np.float64, what="eval y")
    close(np.concatenate([o[2][1] for o in outcomes]), dxe, np.float64, what="eval dx")
    close(sum(o[2][2] for o in outcomes), single.grad_gamma, np.float64, what="eval gg sum", scale=50)
    print(outcomes[1][2][2], outcomes[0][2][2])
