"""Which OPC UA services the read-only mirror serves: an allow-list, by the request's
encoding NodeId. Everything not here (Write, Call, node management, history, queries,
TransferSubscriptions, RegisterServer(2), services unknown) is refused by `opcua_guard`.
"""

from __future__ import annotations

from asyncua import ua
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds

_I = ObjectIds
DISCOVERY = frozenset(
    {
        _I.GetEndpointsRequest_Encoding_DefaultBinary,
        _I.FindServersRequest_Encoding_DefaultBinary,
        _I.CloseSecureChannelRequest_Encoding_DefaultBinary,
    }
)
ALLOWED = DISCOVERY | {
    _I.CreateSessionRequest_Encoding_DefaultBinary,
    _I.ActivateSessionRequest_Encoding_DefaultBinary,
    _I.CloseSessionRequest_Encoding_DefaultBinary,
    _I.ReadRequest_Encoding_DefaultBinary,
    _I.BrowseRequest_Encoding_DefaultBinary,
    _I.TranslateBrowsePathsToNodeIdsRequest_Encoding_DefaultBinary,
    _I.RegisterNodesRequest_Encoding_DefaultBinary,
    _I.UnregisterNodesRequest_Encoding_DefaultBinary,
    _I.CreateSubscriptionRequest_Encoding_DefaultBinary,
    _I.ModifySubscriptionRequest_Encoding_DefaultBinary,
    _I.DeleteSubscriptionsRequest_Encoding_DefaultBinary,
    _I.SetPublishingModeRequest_Encoding_DefaultBinary,
    _I.CreateMonitoredItemsRequest_Encoding_DefaultBinary,
    _I.ModifyMonitoredItemsRequest_Encoding_DefaultBinary,
    _I.DeleteMonitoredItemsRequest_Encoding_DefaultBinary,
    _I.SetMonitoringModeRequest_Encoding_DefaultBinary,
    _I.PublishRequest_Encoding_DefaultBinary,
    _I.RepublishRequest_Encoding_DefaultBinary,
}


def service_name(typeid: ua.NodeId) -> str:
    found = typeid.Identifier
    name = ObjectIdNames.get(found, str(found)) if isinstance(found, int) else str(found)
    return name.removesuffix("_Encoding_DefaultBinary").removesuffix("Request")
