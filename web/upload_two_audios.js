// Upload buttons for Load Two Audios' left_audio / right_audio (the core audio upload widget only binds
// an input named "audio"). Uploads go to ComfyUI's input folder through the standard /upload/image route.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

function addUploadButton(node, widgetName, label) {
  const combo = node.widgets?.find((w) => w.name === widgetName);
  if (!combo) return;
  const picker = document.createElement("input");
  picker.type = "file";
  picker.accept = "audio/*,video/*";
  picker.style.display = "none";
  picker.onchange = async () => {
    const file = picker.files?.[0];
    if (!file) return;
    const body = new FormData();
    body.append("image", file);
    const response = await api.fetchApi("/upload/image", { method: "POST", body });
    if (response.status !== 200) {
      alert(`Upload of ${file.name} failed: ${response.status} ${response.statusText}`);
      return;
    }
    const saved = await response.json();
    const name = saved.subfolder ? `${saved.subfolder}/${saved.name}` : saved.name;
    if (!combo.options.values.includes(name)) combo.options.values.push(name);
    combo.value = name;
    combo.callback?.(name);
    node.graph?.setDirtyCanvas(true);
    picker.value = "";
  };
  document.body.append(picker);
  const button = node.addWidget("button", `upload_${widgetName}`, null, () => picker.click(), { serialize: false });
  button.label = label;
  button.serialize = false; // keep it out of the saved workflow's widgets_values (options.serialize only covers the prompt)
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    picker.remove();
    return onRemoved?.apply(this, arguments);
  };
}

app.registerExtension({
  name: "InfiniteTalk.LoadTwoAudiosUpload",
  async nodeCreated(node) {
    if (node.comfyClass !== "LoadTwoAudios") return;
    addUploadButton(node, "left_audio", "upload left audio");
    addUploadButton(node, "right_audio", "upload right audio");
  },
});
