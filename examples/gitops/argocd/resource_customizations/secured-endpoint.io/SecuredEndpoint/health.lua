-- Argo CD health of a secured-endpoint.io/SecuredEndpoint, from its status (docs/contract.md §1.3, §1.4):
--   Healthy      Ready=True for the current generation: a valid token is in every target
--   Suspended    Ready=False with reason Suspended (spec.suspend: true)
--   Degraded     Ready=False for any other reason; the message says why, whether a retry is planned
--                (Reconciling=True) or a change is needed (Stalled=True), and until when the previous
--                token stays usable
--   Progressing  no status yet, a status for an older generation, or Ready Unknown
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to fetch the first token"
  return hs
end

local ready = condition(obj.status, "Ready")
local observed = obj.status.observedGeneration
if ready ~= nil and ready.observedGeneration ~= nil then
  observed = ready.observedGeneration
end
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

if ready == nil or ready.status == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

local reason = ready.reason or ""
local message = ready.message or ""
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message
  return hs
end

if reason == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
  return hs
end

hs.status = "Degraded"
hs.message = reason .. ": " .. message
local stalled = condition(obj.status, "Stalled")
local reconciling = condition(obj.status, "Reconciling")
if stalled ~= nil and stalled.status == "True" then
  hs.message = hs.message .. " (needs a change to the spec or the referenced objects)"
elseif reconciling ~= nil and reconciling.status == "True" and reconciling.message ~= nil then
  hs.message = hs.message .. " (" .. reconciling.message .. ")"
end
return hs
