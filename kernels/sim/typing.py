"""``nki.typing``: annotations for kernel signatures, ``nt.tensor[shape, dtype]`` (and ``nt.tensor`` alone).

Annotations are not checked by the NKI compiler at call time beyond what the kernel itself asserts; here they are
inert objects, so an annotated kernel runs unchanged."""


class _TensorAnnotation:
    __slots__ = ("args",)

    def __init__(self, args=()):
        self.args = args

    def __getitem__(self, args):
        return _TensorAnnotation(args if isinstance(args, tuple) else (args,))

    def __repr__(self):
        return "nt.tensor" + (f"[{', '.join(map(repr, self.args))}]" if self.args else "")


tensor = _TensorAnnotation()
