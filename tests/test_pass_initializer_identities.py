"""InitializerIdentityEliminationPass: readers of Identity(<initializer>) read the initializer."""
import numpy as np

from amct_core.onnx.passes import InitializerIdentityEliminationPass
from tests.ir_graphs import graph, nodes

W = np.ones(4, np.float32)


def test_readers_of_an_identity_of_an_initializer_read_the_initializer():
    # what torch's exporter writes for two BatchNorm-like readers of equal parameters
    m = graph("""g (float[1, 4] x) => (float[1, 4] y) {
        w2 = Identity(w)
        a = Mul(x, w)
        y = Mul(a, w2)
    }""", w=W)
    assert InitializerIdentityEliminationPass()(m).modified
    assert len(nodes(m)) == 2 and [n.op_type for n in m.graph] == ["Mul", "Mul"]
    assert [v.name for v in list(m.graph)[1].inputs] == ["a", "w"]


def test_an_identity_that_produces_a_graph_output_is_kept():
    m = graph("""g (float[1, 4] x) => (float[1, 4] y, float[4] w2) {
        w2 = Identity(w)
        y = Mul(x, w2)
    }""", w=W)
    assert not InitializerIdentityEliminationPass()(m).modified
    assert [n.op_type for n in m.graph] == ["Identity", "Mul"]


def test_an_identity_of_a_computed_tensor_is_kept():
    m = graph("""g (float[1, 4] x) => (float[1, 4] y) {
        r = Relu(x)
        y2 = Identity(r)
        y = Neg(y2)
    }""")
    assert not InitializerIdentityEliminationPass()(m).modified
    assert list(m.graph)[2].inputs[0].name == "y2"
