-- The actions Argo CD offers on a SecuredEndpoint: "refresh" fetches a new token now (docs/contract.md §4.3).
local actions = {}
actions["refresh"] = {["disabled"] = false, ["iconClass"] = "fa fa-fw fa-rotate-right", ["displayName"] = "Refresh token"}
return actions
