"""The record schema as a protobuf descriptor, built in Python from the same facts as the .proto.

Building the FileDescriptorProto here keeps the package free of generated code (whose runtime
version checks tie it to one protobuf release) and of protoc at run time.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO_FILE = "amct_core/record/scale_offset_record.proto"
PACKAGE = "amct_core.record"

_F = descriptor_pb2.FieldDescriptorProto
# (name, number, label, type, default or None) of SingleLayerRecord, in the .proto's order.
SINGLE_LAYER_FIELDS = (
    ("scale_d", 1, _F.LABEL_OPTIONAL, _F.TYPE_FLOAT, None),
    ("offset_d", 2, _F.LABEL_OPTIONAL, _F.TYPE_INT32, None),
    ("scale_w", 3, _F.LABEL_REPEATED, _F.TYPE_FLOAT, None),
    ("offset_w", 4, _F.LABEL_REPEATED, _F.TYPE_INT32, None),
    ("shift_bit", 5, _F.LABEL_REPEATED, _F.TYPE_UINT32, None),
    ("tensor_balance_factor", 6, _F.LABEL_REPEATED, _F.TYPE_FLOAT, None),
    ("skip_fusion", 9, _F.LABEL_OPTIONAL, _F.TYPE_BOOL, "false"),
    ("dst_type", 10, _F.LABEL_OPTIONAL, _F.TYPE_STRING, "INT8"),
    ("act_type", 11, _F.LABEL_OPTIONAL, _F.TYPE_STRING, "INT8"),
    ("wts_type", 12, _F.LABEL_OPTIONAL, _F.TYPE_STRING, "INT8"),
    ("fakequant_precision_mode", 13, _F.LABEL_OPTIONAL, _F.TYPE_STRING, "DEFAULT"),
)


def file_descriptor_proto() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(name=PROTO_FILE, package=PACKAGE, syntax="proto2")
    layer = fdp.message_type.add(name="SingleLayerRecord")
    for name, number, label, ftype, default in SINGLE_LAYER_FIELDS:
        f = layer.field.add(name=name, number=number, label=label, type=ftype, json_name=_json_name(name))
        if default is not None:
            f.default_value = default
    entry = fdp.message_type.add(name="MapFiledEntry")  # sic: the spelling real files use
    entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING, json_name="key")
    entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL, type=_F.TYPE_MESSAGE,
                    type_name=f".{PACKAGE}.SingleLayerRecord", json_name="value")
    rec = fdp.message_type.add(name="ScaleOffsetRecord")
    rec.field.add(name="record", number=1, label=_F.LABEL_REPEATED, type=_F.TYPE_MESSAGE,
                  type_name=f".{PACKAGE}.MapFiledEntry", json_name="record")
    return fdp


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


_pool = descriptor_pool.DescriptorPool()
_file = _pool.Add(file_descriptor_proto())
ScaleOffsetRecord = message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.ScaleOffsetRecord"))
SingleLayerRecord = message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.SingleLayerRecord"))
MapFiledEntry = message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.MapFiledEntry"))
