-- Orthanc auto-routing to medinfer, as a hospital PACS does it: every instance Orthanc stores
-- is forwarded by C-STORE to the DICOM modality "medinfer" (DicomModalities in orthanc.json),
-- except medinfer's own results (DICOM SR, and the saliency maps that come back as
-- Segmentations, SEG) and instances a Lua script stored, so nothing loops. Each instance goes in its own association: one study arrives over several.
--
-- Used by docker-compose.yml (mounted read-only, listed in orthanc.json "LuaScripts") and by
-- scripts/test-services.sh, whose Orthanc the end-to-end test tests/integration/
-- test_imaging_pacs.py drives: the routing tested is the routing deployed.
function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags["Modality"] ~= "SR" and tags["Modality"] ~= "SEG" and origin["RequestOrigin"] ~= "Lua" then
    -- An unknown modality raises at once (the tests register it after Orthanc starts): one log
    -- line instead of a Lua error. A refused or failed C-STORE ends as a failed Orthanc job.
    local ok, err = pcall(SendToModality, instanceId, "medinfer")
    if not ok then
      print("medinfer routing skipped: " .. tostring(err))
    end
  end
end
