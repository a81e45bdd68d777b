// InfiniteTalk Multi front-end helpers (ComfyUI frontend 1.2x-1.49):
// - Load Two Audios: an upload button and an audio player per side (core binds its audio upload only to an input
//   named "audio"; the player is core's own AUDIO_UI widget, so both node renderers show it). Uploads go to the
//   input folder through the standard /upload/image route and set the combo as core's audio upload does
//   (value, callback, onWidgetChanged).
// - Sampler: choosing a preset fills steps / text_guidance / audio_guidance with that preset's numbers (read
//   from the node definition, `presets` of the preset input); editing them afterwards wins.
// - Model loader: wide enough that every file name reads; a missing file's "Value not in list" error also says
//   where the file goes and where to download it.
// - Template browser: our templates are listed under "InfiniteTalk Multi" instead of the install folder name.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const AUDIO_NODE = "InfiniteTalkLoadTwoAudios";
const SAMPLER = "InfiniteTalkMultiSampler";
const LOADER = "InfiniteTalkModelLoader";
const LOADER_MIN_WIDTH = 520;
const CATEGORY_TITLE = "InfiniteTalk Multi";
// /extensions/<install folder>/infinitetalk.js: the folder is the template browser's module name
const MODULE = decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2, -1)[0] || "");

function inputFileUrl(name) {
  const slash = name.lastIndexOf("/");
  const params = new URLSearchParams({
    filename: slash < 0 ? name : name.slice(slash + 1),
    subfolder: slash < 0 ? "" : name.slice(0, slash),
    type: "input",
  });
  return api.apiURL(`/view?${params}`);
}

function addAudioSide(node, widgetName, side) {
  const combo = node.widgets?.find((w) => w.name === widgetName);
  if (!combo) return;
  const showFile = () => {
    if (!preview) return;
    const url = combo.value ? inputFileUrl(combo.value) : "";
    preview.element.src = url;
    preview.value = url;
    preview.element.classList.toggle("empty-audio-widget", !url);
  };
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
    // as core's audio upload: value, callback, then onWidgetChanged, which is what clears the node's
    // "missing input" state (without it the red ring and Run's warning stay until the combo is picked again)
    const previous = combo.value;
    combo.value = name;
    combo.callback?.(name);
    node.onWidgetChanged?.(combo.name, name, previous, combo);
    node.graph?.setDirtyCanvas(true);
    picker.value = "";
  };
  document.body.append(picker);
  const button = node.addWidget("button", `upload_${widgetName}`, null, () => picker.click(), { serialize: false });
  button.label = `upload ${side} audio`;
  button.serialize = false; // keep it out of the saved workflow's widgets_values (options.serialize only covers the prompt)
  // core's own audio player widget (AUDIO_UI): its value is the file URL, which the classic canvas and the
  // Vue node renderer (Nodes 2.0) both show; a DOM widget of our own is invisible to the latter
  const preview = app.widgets?.AUDIO_UI?.(node, `${side}_audio_player`)?.widget;
  if (preview) preview.serialize = false;
  const callback = combo.callback;
  combo.callback = function () {
    const result = callback?.apply(this, arguments);
    showFile();
    return result;
  };
  showFile();
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    picker.remove();
    return onRemoved?.apply(this, arguments);
  };
  return showFile;
}

function setupAudioNode(node) {
  const refresh = [addAudioSide(node, "left_audio", "left"), addAudioSide(node, "right_audio", "right")];
  const configured = node.onConfigure;
  node.onConfigure = function () { // a loaded workflow sets the combos without their callbacks
    const result = configured?.apply(this, arguments);
    refresh.forEach((show) => show?.());
    return result;
  };
}

function setupSampler(node, presets) {
  const preset = node.widgets?.find((w) => w.name === "preset");
  if (!preset || !presets) return;
  const callback = preset.callback;
  preset.callback = function (value) {
    const result = callback?.apply(this, arguments);
    for (const [name, number] of Object.entries(presets[preset.value] ?? {})) {
      const widget = node.widgets.find((w) => w.name === name);
      if (widget) widget.value = number;
    }
    node.graph?.setDirtyCanvas(true);
    return result;
  };
}

async function samplerPresets(nodeData) {
  const given = nodeData?.input?.required?.preset?.[1]?.presets;
  if (given) return given;
  try { // the front end may drop option keys it does not know: read the raw definition
    const response = await api.fetchApi(`/object_info/${SAMPLER}`);
    return (await response.json())?.[SAMPLER]?.input?.required?.preset?.[1]?.presets;
  } catch {
    return undefined;
  }
}

function nameTemplateCategory() {
  // The browser labels a pack's templates with the i18n key templateWorkflows.category.<module>, falling back
  // to the folder name; vue-i18n keeps its instance in the Vue app's provides under __VUE_I18N_SYMBOL__.
  const vueApp = document.querySelector("#vue-app")?.__vue_app__;
  const i18n = vueApp?._context?.provides?.[vueApp?.__VUE_I18N_SYMBOL__]?.global;
  if (!MODULE || typeof i18n?.mergeLocaleMessage !== "function") return;
  const key = MODULE.replace(/\./g, "_"); // the front end's i18n key form of a module name
  for (const locale of new Set(["en", String(i18n.locale?.value ?? i18n.locale ?? "en")])) {
    i18n.mergeLocaleMessage(locale, { templateWorkflows: { category: { [key]: CATEGORY_TITLE } } });
  }
}

async function loaderHints() {
  // input name -> where its file goes and its download link (the loader's `missing` option of each file combo)
  const response = await api.fetchApi(`/object_info/${LOADER}`);
  const required = (await response.json())?.[LOADER]?.input?.required ?? {};
  return Object.fromEntries(Object.entries(required).filter(([, spec]) => spec?.[1]?.missing)
    .map(([name, spec]) => [name, spec[1].missing]));
}

function addMissingFileHints() {
  // ComfyUI refuses a missing model file with "Value not in list", one error per input: add to each of the
  // loader's what the file is, where it goes and where to download it.
  const fetchApi = api.fetchApi.bind(api);
  api.fetchApi = async function (route, options) {
    const response = await fetchApi(route, options);
    if (route !== "/prompt" || options?.method !== "POST" || response.status !== 400) return response;
    try {
      const body = await response.clone().json();
      const errors = Object.values(body?.node_errors ?? {}).filter((e) => e.class_type === LOADER)
        .flatMap((e) => e.errors ?? []).filter((e) => e.type === "value_not_in_list");
      if (!errors.length) return response;
      const hints = await loaderHints();
      for (const error of errors) {
        const hint = hints[error.extra_info?.input_name];
        if (hint) error.details = `${error.details}: ${hint}`;
      }
      return new Response(JSON.stringify(body), { status: response.status, statusText: response.statusText,
                                                  headers: response.headers });
    } catch {
      return response;
    }
  };
}

let presets;

app.registerExtension({
  name: "InfiniteTalk.Nodes",
  async setup() {
    nameTemplateCategory();
    addMissingFileHints();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === SAMPLER) presets = await samplerPresets(nodeData);
  },
  async nodeCreated(node) {
    if (node.comfyClass === AUDIO_NODE) setupAudioNode(node);
    if (node.comfyClass === SAMPLER) setupSampler(node, presets);
    if (node.comfyClass === LOADER && node.size[0] < LOADER_MIN_WIDTH) node.setSize([LOADER_MIN_WIDTH, node.size[1]]);
  },
});
